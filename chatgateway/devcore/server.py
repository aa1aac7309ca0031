"""gRPC face of the reference core: authenticate each call, hand it to the model.

``verify(token)`` returns claims with ``.profile_id`` or raises (normally
``chatgateway.auth.tokens.AuthError``); any failure to verify is UNAUTHENTICATED, so a
broken verifier fails closed. Errors that are not AuthError are also logged.
"""

from concurrent import futures

import grpc
from twisted.logger import Logger

from chatgateway.api import chat_pb2_grpc
from chatgateway.devcore.model import CoreError


def _is_auth_error(error):
    try:
        from chatgateway.auth.tokens import AuthError
    except ImportError:  # verifiers other than chatgateway.auth.tokens's raise their own errors
        return False
    return isinstance(error, AuthError)


def bearer_token(context):
    """The token of the ``authorization: Bearer <jwt>`` metadata, or ""."""
    for key, value in context.invocation_metadata() or ():
        if key.lower() == "authorization":
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer":
                return token.strip()
    return ""


class ChatCoreServicer(chat_pb2_grpc.ChatServiceServicer):
    log = Logger()

    def __init__(self, model, verify):
        self.model = model
        self.verify = verify

    def _caller(self, context):
        token = bearer_token(context)
        if not token:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing bearer token")
        try:
            claims = self.verify(token)
        except Exception as e:
            if not _is_auth_error(e):
                self.log.failure("token verification failed unexpectedly")
            context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e) or "invalid token")
        return claims.profile_id

    def _call(self, operation, request, context):
        caller = self._caller(context)
        try:
            return operation(caller, request)
        except CoreError as e:
            context.abort(e.code, e.message)

    def Connect(self, request_iterator, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "Connect is served by the gateway")

    def SendEvent(self, request, context):
        return self._call(self.model.send_event, request, context)

    def GetHistory(self, request, context):
        return self._call(self.model.get_history, request, context)

    def CreateRoom(self, request, context):
        return self._call(self.model.create_room, request, context)

    def SearchRooms(self, request, context):
        pages = self._call(self.model.search_rooms, request, context)
        while True:
            try:
                page = next(pages)
            except StopIteration:
                return
            except CoreError as e:
                context.abort(e.code, e.message)
            yield page

    def UpdateRoom(self, request, context):
        return self._call(self.model.update_room, request, context)

    def DeleteRoom(self, request, context):
        return self._call(self.model.delete_room, request, context)

    def AddRoomSubscriptions(self, request, context):
        return self._call(self.model.add_room_subscriptions, request, context)

    def RemoveRoomSubscriptions(self, request, context):
        return self._call(self.model.remove_room_subscriptions, request, context)

    def UpdateSubscriptionRole(self, request, context):
        return self._call(self.model.update_subscription_role, request, context)

    def SearchRoomSubscriptions(self, request, context):
        return self._call(self.model.search_room_subscriptions, request, context)


def make_grpc_server(servicer, address, max_workers=16):
    """A started grpc.Server serving ``servicer`` on ``address`` ("host:port", port 0 picks one).

    Returns (server, bound_port).
    """
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="chatcore"))
    chat_pb2_grpc.add_ChatServiceServicer_to_server(servicer, server)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as e:
        raise OSError(f"cannot listen on {address}: {e}") from None
    if not port:
        raise OSError(f"cannot listen on {address}")
    server.start()
    return server, port
