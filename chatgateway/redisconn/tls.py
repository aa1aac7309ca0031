"""TLS to Redis (``rediss://`` and ``rediss+cluster://``): the settings and Twisted's client options.

REDIS_TLS_CA_FILE        PEM file of the CA(s) to trust; empty: the platform's trust store
REDIS_TLS_CERT_FILE      PEM client certificate (with REDIS_TLS_KEY_FILE), for Redis's tls-auth-clients
REDIS_TLS_KEY_FILE       PEM private key of that certificate
REDIS_TLS_VERIFY         true (default): the server's certificate must chain to the CA and name
                         the host of the URI; false: encrypted but not authenticated

The files are read once, when the configuration is loaded (``check``), so a bad path
or a certificate that does not parse stops the start with one line naming the
setting, instead of a reconnect loop. A server that fails verification is a TLS
handshake error on every attempt; the connection logs it as such
(chatgateway.redisconn.connection).
"""

import dataclasses
import functools
from urllib.parse import urlsplit

from twisted.internet import ssl


@dataclasses.dataclass(frozen=True)
class TLSSettings:
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    verify: bool = True

    @classmethod
    def of(cls, config):
        return cls(
            config.redis_tls_ca_file, config.redis_tls_cert_file, config.redis_tls_key_file, config.redis_tls_verify
        )

    def client_options(self, hostname):
        """The IOpenSSLClientConnectionCreator for a connection to ``hostname``."""
        return _client_options(self, hostname)


def _read(path, setting):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"{setting}={path!r}: cannot read it ({e.strerror})") from None


def _load(settings):
    """(trust root or None, client PrivateCertificate or None); ValueError naming the setting."""
    trust = None
    if settings.ca_file:
        try:
            trust = ssl.Certificate.loadPEM(_read(settings.ca_file, "REDIS_TLS_CA_FILE"))
        except ValueError:
            raise
        except Exception as e:
            raise ValueError(f"REDIS_TLS_CA_FILE={settings.ca_file!r}: not a PEM certificate ({e})") from None
    client = None
    if bool(settings.cert_file) != bool(settings.key_file):
        raise ValueError("REDIS_TLS_CERT_FILE and REDIS_TLS_KEY_FILE go together: set both or neither")
    if settings.cert_file:
        cert = _read(settings.cert_file, "REDIS_TLS_CERT_FILE")
        key = _read(settings.key_file, "REDIS_TLS_KEY_FILE")
        try:
            client = ssl.PrivateCertificate.loadPEM(cert + b"\n" + key)
        except Exception as e:
            raise ValueError(
                f"REDIS_TLS_CERT_FILE={settings.cert_file!r} / REDIS_TLS_KEY_FILE={settings.key_file!r}: "
                f"not a PEM certificate and its key ({e})"
            ) from None
    return trust, client


def check(settings):
    """Read and parse the files now; ValueError (one line naming the setting) if they are unusable."""
    _load(settings)


def config_problems(values):
    """The configuration's TLS problems (one line each), when CACHE_URI or EVENTS_URI is rediss://.
    ``values``: the parsed settings by field name (a setting that did not parse is None)."""
    uris = (values["cache_uri"] or "", values["events_uri"] or "")
    if not any(urlsplit(uri).scheme.startswith("rediss") for uri in uris):
        return []
    names = ("redis_tls_ca_file", "redis_tls_cert_file", "redis_tls_key_file")
    try:
        check(TLSSettings(*(values[name] or "" for name in names)))
    except ValueError as e:
        return [str(e)]
    return []


@functools.lru_cache(maxsize=64)
def _client_options(settings, hostname):
    trust, client = _load(settings)
    if not settings.verify:
        if client is None:
            return ssl.CertificateOptions(verify=False)
        return ssl.CertificateOptions(privateKey=client.privateKey.original, certificate=client.original, verify=False)
    return ssl.optionsForClientTLS(
        hostname, trustRoot=trust if trust is not None else ssl.platformTrust(), clientCertificate=client
    )
