"""The reference core chat service: the ten forwarded ChatService methods over gRPC.

``model`` decides (with the shared checks of ``rules``), ``storage`` keeps rooms,
memberships and events in SQLite, ``publishing`` sends what changed on the bus,
``server`` maps gRPC calls onto the model, ``service`` runs it under twistd, ``tap``
is ``twistd chatcore``.
"""
