"""Redis Cluster key slots: CRC16 (XMODEM) of a key's hash tag, modulo 16384.

A key's hashed part is what is between its first ``{`` and the next ``}`` when that
is not empty, else the whole key; keys (and sharded channels) with the same hashed
part live in one slot, so one script may touch them all.
"""

SLOTS = 16384


def _table():
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
        table.append(crc & 0xFFFF)
    return table


_TABLE = _table()


def crc16(data):
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ _TABLE[((crc >> 8) ^ byte) & 0xFF]
    return crc


def hashed_part(key):
    """The bytes of ``key`` (str or bytes) that choose its slot."""
    data = key.encode("utf-8") if isinstance(key, str) else bytes(key)
    start = data.find(b"{")
    if start >= 0:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            return data[start + 1 : end]
    return data


def key_slot(key):
    return crc16(hashed_part(key)) % SLOTS


def tag_of(name):
    """A hash tag that puts a key in the slot of ``name`` (a channel): ``{`` + its hashed part + ``}``.

    ValueError when no tag can (a name with a ``}`` but no hash tag of its own).
    """
    part = hashed_part(name).decode("utf-8", "surrogateescape")
    if "}" in part:
        raise ValueError(f"{name!r}: a name with '}}' and no hash tag cannot share a slot with keys")
    return "{" + part + "}"
