"""LOG_LEVEL for a twistd process.

twistd starts its log observer after makeService, so the level is applied
by a service when the tree starts: every observer then in place is wrapped
in a filter, and txaio (Autobahn's logging) gets the same level.
"""

import txaio
from twisted.application import service
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogPublisher,
)

_TXAIO_NAMES = {"debug": "debug", "info": "info", "warning": "warn", "error": "error"}


class LogLevelService(service.Service):
    name = "log-level"

    def __init__(self, level, publisher=None):
        self.level = level
        self._publisher = publisher if publisher is not None else globalLogPublisher

    def startService(self):
        super().startService()
        txaio.set_global_log_level(_TXAIO_NAMES[self.level])
        predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.levelWithName(self.level.replace("warning", "warn")))
        for observer in list(self._publisher._observers):
            wrapped = FilteringLogObserver(observer, [predicate])
            self._publisher.removeObserver(observer)
            self._publisher.addObserver(wrapped)

    # The filter stays through shutdown: unwrapping on stop would let the
    # debug events of the closing connections through.
