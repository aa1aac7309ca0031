import datetime

from google.protobuf import any_pb2 as _any_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Room(_message.Message):
    __slots__ = ("id", "name", "description", "is_private", "metadata", "created_by", "created_at", "updated_at")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    IS_PRIVATE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CREATED_BY_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    description: str
    is_private: bool
    metadata: _struct_pb2.Struct
    created_by: str
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., description: _Optional[str] = ..., is_private: _Optional[bool] = ..., metadata: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., created_by: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class RoomSubscription(_message.Message):
    __slots__ = ("room_id", "profile_id", "roles", "joined_at")
    ROOM_ID_FIELD_NUMBER: _ClassVar[int]
    PROFILE_ID_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    JOINED_AT_FIELD_NUMBER: _ClassVar[int]
    room_id: str
    profile_id: str
    roles: _containers.RepeatedScalarFieldContainer[str]
    joined_at: _timestamp_pb2.Timestamp
    def __init__(self, room_id: _Optional[str] = ..., profile_id: _Optional[str] = ..., roles: _Optional[_Iterable[str]] = ..., joined_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class RoomEvent(_message.Message):
    __slots__ = ("id", "room_id", "sender_id", "type", "payload", "sent_at", "edited", "redacted", "replaces_event_id", "relates_to_event_id", "epoch", "offset")
    class Type(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        TYPE_UNSPECIFIED: _ClassVar[RoomEvent.Type]
        TEXT: _ClassVar[RoomEvent.Type]
        ATTACHMENT: _ClassVar[RoomEvent.Type]
        REACTION: _ClassVar[RoomEvent.Type]
        ENCRYPTED: _ClassVar[RoomEvent.Type]
        SYSTEM: _ClassVar[RoomEvent.Type]
        CALL_OFFER: _ClassVar[RoomEvent.Type]
        CALL_ANSWER: _ClassVar[RoomEvent.Type]
        CALL_ICE: _ClassVar[RoomEvent.Type]
        CALL_END: _ClassVar[RoomEvent.Type]
        CUSTOM: _ClassVar[RoomEvent.Type]
    TYPE_UNSPECIFIED: RoomEvent.Type
    TEXT: RoomEvent.Type
    ATTACHMENT: RoomEvent.Type
    REACTION: RoomEvent.Type
    ENCRYPTED: RoomEvent.Type
    SYSTEM: RoomEvent.Type
    CALL_OFFER: RoomEvent.Type
    CALL_ANSWER: RoomEvent.Type
    CALL_ICE: RoomEvent.Type
    CALL_END: RoomEvent.Type
    CUSTOM: RoomEvent.Type
    ID_FIELD_NUMBER: _ClassVar[int]
    ROOM_ID_FIELD_NUMBER: _ClassVar[int]
    SENDER_ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    SENT_AT_FIELD_NUMBER: _ClassVar[int]
    EDITED_FIELD_NUMBER: _ClassVar[int]
    REDACTED_FIELD_NUMBER: _ClassVar[int]
    REPLACES_EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    RELATES_TO_EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    id: str
    room_id: str
    sender_id: str
    type: RoomEvent.Type
    payload: _struct_pb2.Struct
    sent_at: _timestamp_pb2.Timestamp
    edited: bool
    redacted: bool
    replaces_event_id: str
    relates_to_event_id: str
    epoch: str
    offset: int
    def __init__(self, id: _Optional[str] = ..., room_id: _Optional[str] = ..., sender_id: _Optional[str] = ..., type: _Optional[_Union[RoomEvent.Type, str]] = ..., payload: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., sent_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., edited: _Optional[bool] = ..., redacted: _Optional[bool] = ..., replaces_event_id: _Optional[str] = ..., relates_to_event_id: _Optional[str] = ..., epoch: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class ErrorDetail(_message.Message):
    __slots__ = ("code", "status", "message", "meta")
    class MetaEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CODE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    code: int
    status: str
    message: str
    meta: _containers.ScalarMap[str, str]
    def __init__(self, code: _Optional[int] = ..., status: _Optional[str] = ..., message: _Optional[str] = ..., meta: _Optional[_Mapping[str, str]] = ...) -> None: ...

class StreamRequest(_message.Message):
    __slots__ = ("auth_token", "device_id", "resume_token", "ack", "command", "positions")
    AUTH_TOKEN_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    auth_token: str
    device_id: str
    resume_token: str
    ack: Ack
    command: ClientCommand
    positions: _containers.RepeatedCompositeFieldContainer[RoomPosition]
    def __init__(self, auth_token: _Optional[str] = ..., device_id: _Optional[str] = ..., resume_token: _Optional[str] = ..., ack: _Optional[_Union[Ack, _Mapping]] = ..., command: _Optional[_Union[ClientCommand, _Mapping]] = ..., positions: _Optional[_Iterable[_Union[RoomPosition, _Mapping]]] = ...) -> None: ...

class RoomPosition(_message.Message):
    __slots__ = ("room_id", "epoch", "offset")
    ROOM_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    room_id: str
    epoch: str
    offset: int
    def __init__(self, room_id: _Optional[str] = ..., epoch: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("event_id", "room_id", "epoch", "offset")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    ROOM_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    room_id: str
    epoch: str
    offset: int
    def __init__(self, event_id: _Optional[str] = ..., room_id: _Optional[str] = ..., epoch: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class ClientCommand(_message.Message):
    __slots__ = ("request_id", "room_event", "typing", "read_marker", "subscribe", "unsubscribe", "call", "call_signal", "presence")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ROOM_EVENT_FIELD_NUMBER: _ClassVar[int]
    TYPING_FIELD_NUMBER: _ClassVar[int]
    READ_MARKER_FIELD_NUMBER: _ClassVar[int]
    SUBSCRIBE_FIELD_NUMBER: _ClassVar[int]
    UNSUBSCRIBE_FIELD_NUMBER: _ClassVar[int]
    CALL_FIELD_NUMBER: _ClassVar[int]
    CALL_SIGNAL_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    room_event: RoomEvent
    typing: TypingCommand
    read_marker: ReadMarkerCommand
    subscribe: RoomsCommand
    unsubscribe: RoomsCommand
    call: CallCommand
    call_signal: CallSignal
    presence: GetPresenceRequest
    def __init__(self, request_id: _Optional[str] = ..., room_event: _Optional[_Union[RoomEvent, _Mapping]] = ..., typing: _Optional[_Union[TypingCommand, _Mapping]] = ..., read_marker: _Optional[_Union[ReadMarkerCommand, _Mapping]] = ..., subscribe: _Optional[_Union[RoomsCommand, _Mapping]] = ..., unsubscribe: _Optional[_Union[RoomsCommand, _Mapping]] = ..., call: _Optional[_Union[CallCommand, _Mapping]] = ..., call_signal: _Optional[_Union[CallSignal, _Mapping]] = ..., presence: _Optional[_Union[GetPresenceRequest, _Mapping]] = ...) -> None: ...

class TypingCommand(_message.Message):
    __slots__ = ("room_id", "typing")
    ROOM_ID_FIELD_NUMBER: _ClassVar[int]
    TYPING_FIELD_NUMBER: _ClassVar[int]
    room_id: str
    typing: bool
    def __init__(self, room_id: _Optional[str] = ..., typing: _Optional[bool] = ...) -> None: ...

class ReadMarkerCommand(_message.Message):
    __slots__ = ("room_id", "event_id")
    ROOM_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    room_id: str
    event_id: str
    def __init__(self, room_id: _Optional[str] = ..., event_id: _Optional[str] = ...) -> None: ...

class RoomsCommand(_message.Message):
    __slots__ = ("room_ids",)
    ROOM_IDS_FIELD_NUMBER: _ClassVar[int]
    room_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, room_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class CallCommand(_message.Message):
    __slots__ = ("method", "body")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    method: str
    body: _any_pb2.Any
    def __init__(self, method: _Optional[str] = ..., body: _Optional[_Union[_any_pb2.Any, _Mapping]] = ...) -> None: ...

class ServerEvent(_message.Message):
    __slots__ = ("id", "timestamp", "connected", "message", "typing_event", "receipt_event", "presence_event", "command_result", "subscription_event", "error", "gap", "call_signal_event", "epoch", "offset")
    ID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TYPING_EVENT_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_EVENT_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_EVENT_FIELD_NUMBER: _ClassVar[int]
    COMMAND_RESULT_FIELD_NUMBER: _ClassVar[int]
    SUBSCRIPTION_EVENT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    GAP_FIELD_NUMBER: _ClassVar[int]
    CALL_SIGNAL_EVENT_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    id: str
    timestamp: _timestamp_pb2.Timestamp
    connected: Connected
    message: RoomEvent
    typing_event: TypingEvent
    receipt_event: ReceiptEvent
    presence_event: PresenceEvent
    command_result: CommandResult
    subscription_event: SubscriptionEvent
    error: ErrorDetail
    gap: GapEvent
    call_signal_event: CallSignalEvent
    epoch: str
    offset: int
    def __init__(self, id: _Optional[str] = ..., timestamp: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., connected: _Optional[_Union[Connected, _Mapping]] = ..., message: _Optional[_Union[RoomEvent, _Mapping]] = ..., typing_event: _Optional[_Union[TypingEvent, _Mapping]] = ..., receipt_event: _Optional[_Union[ReceiptEvent, _Mapping]] = ..., presence_event: _Optional[_Union[PresenceEvent, _Mapping]] = ..., command_result: _Optional[_Union[CommandResult, _Mapping]] = ..., subscription_event: _Optional[_Union[SubscriptionEvent, _Mapping]] = ..., error: _Optional[_Union[ErrorDetail, _Mapping]] = ..., gap: _Optional[_Union[GapEvent, _Mapping]] = ..., call_signal_event: _Optional[_Union[CallSignalEvent, _Mapping]] = ..., epoch: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class Connected(_message.Message):
    __slots__ = ("gateway_id", "session_id", "profile_id", "device_id", "heartbeat_interval_sec", "room_ids", "resume_token", "resumed")
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PROFILE_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_SEC_FIELD_NUMBER: _ClassVar[int]
    ROOM_IDS_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FIELD_NUMBER: _ClassVar[int]
    gateway_id: str
    session_id: str
    profile_id: str
    device_id: str
    heartbeat_interval_sec: int
    room_ids: _containers.RepeatedScalarFieldContainer[str]
    resume_token: str
    resumed: bool
    def __init__(self, gateway_id: _Optional[str] = ..., session_id: _Optional[str] = ..., profile_id: _Optional[str] = ..., device_id: _Optional[str] = ..., heartbeat_interval_sec: _Optional[int] = ..., room_ids: _Optional[_Iterable[str]] = ..., resume_token: _Optional[str] = ..., resumed: _Optional[bool] = ...) -> None: ...

class GapEvent(_message.Message):
    __slots__ = ("room_id", "epoch", "first_offset", "last_offset", "reason")
    ROOM_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    FIRST_OFFSET_FIELD_NUMBER: _ClassVar[int]
    LAST_OFFSET_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    room_id: str
    epoch: str
    first_offset: int
    last_offset: int
    reason: str
    def __init__(self, room_id: _Optional[str] = ..., epoch: _Optional[str] = ..., first_offset: _Optional[int] = ..., last_offset: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class TypingEvent(_message.Message):
    __slots__ = ("room_id", "profile_id", "typing")
    ROOM_ID_FIELD_NUMBER: _ClassVar[int]
    PROFILE_ID_FIELD_NUMBER: _ClassVar[int]
    TYPING_FIELD_NUMBER: _ClassVar[int]
    room_id: str
    profile_id: str
    typing: bool
    def __init__(self, room_id: _Optional[str] = ..., profile_id: _Optional[str] = ..., typing: _Optional[bool] = ...) -> None: ...

class ReceiptEvent(_message.Message):
    __slots__ = ("room_id", "profile_id", "event_id")
    ROOM_ID_FIELD_NUMBER: _ClassVar[int]
    PROFILE_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    room_id: str
    profile_id: str
    event_id: str
    def __init__(self, room_id: _Optional[str] = ..., profile_id: _Optional[str] = ..., event_id: _Optional[str] = ...) -> None: ...

class PresenceEvent(_message.Message):
    __slots__ = ("profile_id", "status", "last_active", "room_id")
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATUS_UNSPECIFIED: _ClassVar[PresenceEvent.Status]
        ONLINE: _ClassVar[PresenceEvent.Status]
        OFFLINE: _ClassVar[PresenceEvent.Status]
    STATUS_UNSPECIFIED: PresenceEvent.Status
    ONLINE: PresenceEvent.Status
    OFFLINE: PresenceEvent.Status
    PROFILE_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    LAST_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    ROOM_ID_FIELD_NUMBER: _ClassVar[int]
    profile_id: str
    status: PresenceEvent.Status
    last_active: _timestamp_pb2.Timestamp
    room_id: str
    def __init__(self, profile_id: _Optional[str] = ..., status: _Optional[_Union[PresenceEvent.Status, str]] = ..., last_active: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., room_id: _Optional[str] = ...) -> None: ...

class GetPresenceRequest(_message.Message):
    __slots__ = ("room_id",)
    ROOM_ID_FIELD_NUMBER: _ClassVar[int]
    room_id: str
    def __init__(self, room_id: _Optional[str] = ...) -> None: ...

class GetPresenceResponse(_message.Message):
    __slots__ = ("room_id", "online_count", "profile_ids", "counts_only")
    ROOM_ID_FIELD_NUMBER: _ClassVar[int]
    ONLINE_COUNT_FIELD_NUMBER: _ClassVar[int]
    PROFILE_IDS_FIELD_NUMBER: _ClassVar[int]
    COUNTS_ONLY_FIELD_NUMBER: _ClassVar[int]
    room_id: str
    online_count: int
    profile_ids: _containers.RepeatedScalarFieldContainer[str]
    counts_only: bool
    def __init__(self, room_id: _Optional[str] = ..., online_count: _Optional[int] = ..., profile_ids: _Optional[_Iterable[str]] = ..., counts_only: _Optional[bool] = ...) -> None: ...

class CallSignal(_message.Message):
    __slots__ = ("call_id", "kind", "room_id", "to_profile_id", "to_device_id", "payload")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[CallSignal.Kind]
        OFFER: _ClassVar[CallSignal.Kind]
        ANSWER: _ClassVar[CallSignal.Kind]
        ICE: _ClassVar[CallSignal.Kind]
        END: _ClassVar[CallSignal.Kind]
        TAKEN: _ClassVar[CallSignal.Kind]
    KIND_UNSPECIFIED: CallSignal.Kind
    OFFER: CallSignal.Kind
    ANSWER: CallSignal.Kind
    ICE: CallSignal.Kind
    END: CallSignal.Kind
    TAKEN: CallSignal.Kind
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ROOM_ID_FIELD_NUMBER: _ClassVar[int]
    TO_PROFILE_ID_FIELD_NUMBER: _ClassVar[int]
    TO_DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    call_id: str
    kind: CallSignal.Kind
    room_id: str
    to_profile_id: str
    to_device_id: str
    payload: _struct_pb2.Struct
    def __init__(self, call_id: _Optional[str] = ..., kind: _Optional[_Union[CallSignal.Kind, str]] = ..., room_id: _Optional[str] = ..., to_profile_id: _Optional[str] = ..., to_device_id: _Optional[str] = ..., payload: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class CallSignalEvent(_message.Message):
    __slots__ = ("call_id", "kind", "room_id", "from_profile_id", "from_device_id", "to_profile_id", "to_device_id", "payload")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ROOM_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_PROFILE_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    TO_PROFILE_ID_FIELD_NUMBER: _ClassVar[int]
    TO_DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    call_id: str
    kind: CallSignal.Kind
    room_id: str
    from_profile_id: str
    from_device_id: str
    to_profile_id: str
    to_device_id: str
    payload: _struct_pb2.Struct
    def __init__(self, call_id: _Optional[str] = ..., kind: _Optional[_Union[CallSignal.Kind, str]] = ..., room_id: _Optional[str] = ..., from_profile_id: _Optional[str] = ..., from_device_id: _Optional[str] = ..., to_profile_id: _Optional[str] = ..., to_device_id: _Optional[str] = ..., payload: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class SubscriptionEvent(_message.Message):
    __slots__ = ("room_id", "profile_id", "change", "roles")
    class Change(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        CHANGE_UNSPECIFIED: _ClassVar[SubscriptionEvent.Change]
        ADDED: _ClassVar[SubscriptionEvent.Change]
        REMOVED: _ClassVar[SubscriptionEvent.Change]
        ROLE_CHANGED: _ClassVar[SubscriptionEvent.Change]
    CHANGE_UNSPECIFIED: SubscriptionEvent.Change
    ADDED: SubscriptionEvent.Change
    REMOVED: SubscriptionEvent.Change
    ROLE_CHANGED: SubscriptionEvent.Change
    ROOM_ID_FIELD_NUMBER: _ClassVar[int]
    PROFILE_ID_FIELD_NUMBER: _ClassVar[int]
    CHANGE_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    room_id: str
    profile_id: str
    change: SubscriptionEvent.Change
    roles: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, room_id: _Optional[str] = ..., profile_id: _Optional[str] = ..., change: _Optional[_Union[SubscriptionEvent.Change, str]] = ..., roles: _Optional[_Iterable[str]] = ...) -> None: ...

class CommandResult(_message.Message):
    __slots__ = ("request_id", "error", "body", "more")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    error: ErrorDetail
    body: _any_pb2.Any
    more: bool
    def __init__(self, request_id: _Optional[str] = ..., error: _Optional[_Union[ErrorDetail, _Mapping]] = ..., body: _Optional[_Union[_any_pb2.Any, _Mapping]] = ..., more: _Optional[bool] = ...) -> None: ...

class SendEventRequest(_message.Message):
    __slots__ = ("event",)
    EVENT_FIELD_NUMBER: _ClassVar[int]
    event: RoomEvent
    def __init__(self, event: _Optional[_Union[RoomEvent, _Mapping]] = ...) -> None: ...

class SendEventResponse(_message.Message):
    __slots__ = ("event",)
    EVENT_FIELD_NUMBER: _ClassVar[int]
    event: RoomEvent
    def __init__(self, event: _Optional[_Union[RoomEvent, _Mapping]] = ...) -> None: ...

class GetHistoryRequest(_message.Message):
    __slots__ = ("room_id", "cursor", "limit", "direction", "after_epoch", "after_offset")
    class Direction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        BACKWARD: _ClassVar[GetHistoryRequest.Direction]
        FORWARD: _ClassVar[GetHistoryRequest.Direction]
    BACKWARD: GetHistoryRequest.Direction
    FORWARD: GetHistoryRequest.Direction
    ROOM_ID_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    AFTER_EPOCH_FIELD_NUMBER: _ClassVar[int]
    AFTER_OFFSET_FIELD_NUMBER: _ClassVar[int]
    room_id: str
    cursor: str
    limit: int
    direction: GetHistoryRequest.Direction
    after_epoch: str
    after_offset: int
    def __init__(self, room_id: _Optional[str] = ..., cursor: _Optional[str] = ..., limit: _Optional[int] = ..., direction: _Optional[_Union[GetHistoryRequest.Direction, str]] = ..., after_epoch: _Optional[str] = ..., after_offset: _Optional[int] = ...) -> None: ...

class GetHistoryResponse(_message.Message):
    __slots__ = ("events", "next_cursor")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_CURSOR_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[RoomEvent]
    next_cursor: str
    def __init__(self, events: _Optional[_Iterable[_Union[RoomEvent, _Mapping]]] = ..., next_cursor: _Optional[str] = ...) -> None: ...

class CreateRoomRequest(_message.Message):
    __slots__ = ("id", "name", "description", "is_private", "metadata", "member_ids")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    IS_PRIVATE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    MEMBER_IDS_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    description: str
    is_private: bool
    metadata: _struct_pb2.Struct
    member_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., description: _Optional[str] = ..., is_private: _Optional[bool] = ..., metadata: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., member_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class CreateRoomResponse(_message.Message):
    __slots__ = ("room",)
    ROOM_FIELD_NUMBER: _ClassVar[int]
    room: Room
    def __init__(self, room: _Optional[_Union[Room, _Mapping]] = ...) -> None: ...

class SearchRoomsRequest(_message.Message):
    __slots__ = ("query", "page_size", "limit", "cursor")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    query: str
    page_size: int
    limit: int
    cursor: str
    def __init__(self, query: _Optional[str] = ..., page_size: _Optional[int] = ..., limit: _Optional[int] = ..., cursor: _Optional[str] = ...) -> None: ...

class SearchRoomsResponse(_message.Message):
    __slots__ = ("data", "next_cursor")
    DATA_FIELD_NUMBER: _ClassVar[int]
    NEXT_CURSOR_FIELD_NUMBER: _ClassVar[int]
    data: _containers.RepeatedCompositeFieldContainer[Room]
    next_cursor: str
    def __init__(self, data: _Optional[_Iterable[_Union[Room, _Mapping]]] = ..., next_cursor: _Optional[str] = ...) -> None: ...

class UpdateRoomRequest(_message.Message):
    __slots__ = ("room_id", "name", "description", "metadata", "is_private")
    ROOM_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    IS_PRIVATE_FIELD_NUMBER: _ClassVar[int]
    room_id: str
    name: str
    description: str
    metadata: _struct_pb2.Struct
    is_private: bool
    def __init__(self, room_id: _Optional[str] = ..., name: _Optional[str] = ..., description: _Optional[str] = ..., metadata: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., is_private: _Optional[bool] = ...) -> None: ...

class UpdateRoomResponse(_message.Message):
    __slots__ = ("room",)
    ROOM_FIELD_NUMBER: _ClassVar[int]
    room: Room
    def __init__(self, room: _Optional[_Union[Room, _Mapping]] = ...) -> None: ...

class DeleteRoomRequest(_message.Message):
    __slots__ = ("room_id",)
    ROOM_ID_FIELD_NUMBER: _ClassVar[int]
    room_id: str
    def __init__(self, room_id: _Optional[str] = ...) -> None: ...

class DeleteRoomResponse(_message.Message):
    __slots__ = ("room_id",)
    ROOM_ID_FIELD_NUMBER: _ClassVar[int]
    room_id: str
    def __init__(self, room_id: _Optional[str] = ...) -> None: ...

class AddRoomSubscriptionsRequest(_message.Message):
    __slots__ = ("room_id", "members")
    ROOM_ID_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    room_id: str
    members: _containers.RepeatedCompositeFieldContainer[RoomSubscription]
    def __init__(self, room_id: _Optional[str] = ..., members: _Optional[_Iterable[_Union[RoomSubscription, _Mapping]]] = ...) -> None: ...

class AddRoomSubscriptionsResponse(_message.Message):
    __slots__ = ("subscriptions",)
    SUBSCRIPTIONS_FIELD_NUMBER: _ClassVar[int]
    subscriptions: _containers.RepeatedCompositeFieldContainer[RoomSubscription]
    def __init__(self, subscriptions: _Optional[_Iterable[_Union[RoomSubscription, _Mapping]]] = ...) -> None: ...

class RemoveRoomSubscriptionsRequest(_message.Message):
    __slots__ = ("room_id", "profile_ids")
    ROOM_ID_FIELD_NUMBER: _ClassVar[int]
    PROFILE_IDS_FIELD_NUMBER: _ClassVar[int]
    room_id: str
    profile_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, room_id: _Optional[str] = ..., profile_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class RemoveRoomSubscriptionsResponse(_message.Message):
    __slots__ = ("removed_profile_ids",)
    REMOVED_PROFILE_IDS_FIELD_NUMBER: _ClassVar[int]
    removed_profile_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, removed_profile_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class UpdateSubscriptionRoleRequest(_message.Message):
    __slots__ = ("room_id", "profile_id", "roles")
    ROOM_ID_FIELD_NUMBER: _ClassVar[int]
    PROFILE_ID_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    room_id: str
    profile_id: str
    roles: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, room_id: _Optional[str] = ..., profile_id: _Optional[str] = ..., roles: _Optional[_Iterable[str]] = ...) -> None: ...

class UpdateSubscriptionRoleResponse(_message.Message):
    __slots__ = ("subscription",)
    SUBSCRIPTION_FIELD_NUMBER: _ClassVar[int]
    subscription: RoomSubscription
    def __init__(self, subscription: _Optional[_Union[RoomSubscription, _Mapping]] = ...) -> None: ...

class SearchRoomSubscriptionsRequest(_message.Message):
    __slots__ = ("room_id", "query", "page_size", "cursor")
    ROOM_ID_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    room_id: str
    query: str
    page_size: int
    cursor: str
    def __init__(self, room_id: _Optional[str] = ..., query: _Optional[str] = ..., page_size: _Optional[int] = ..., cursor: _Optional[str] = ...) -> None: ...

class SearchRoomSubscriptionsResponse(_message.Message):
    __slots__ = ("data", "next_cursor")
    DATA_FIELD_NUMBER: _ClassVar[int]
    NEXT_CURSOR_FIELD_NUMBER: _ClassVar[int]
    data: _containers.RepeatedCompositeFieldContainer[RoomSubscription]
    next_cursor: str
    def __init__(self, data: _Optional[_Iterable[_Union[RoomSubscription, _Mapping]]] = ..., next_cursor: _Optional[str] = ...) -> None: ...
