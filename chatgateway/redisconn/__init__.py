"""The Redis wire shared by the store and the bus (txredisapi connections, timeouts)."""
