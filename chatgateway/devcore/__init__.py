"""The reference core chat service: the ten forwarded ChatService methods over gRPC.

``model`` decides and stores (SQLite), ``server`` maps gRPC calls onto it,
``service`` runs it under twistd, ``tap`` is ``twistd chatcore``.
"""
