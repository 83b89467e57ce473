"""TLS for the clients: whose certificates to trust, which to present, and tritonclient's options for them.

    TLS()                                         # verify the server against the system's CAs
    TLS(ca_file="ca.pem")                         # against this CA (a private one, Triton's --grpc-root-cert)
    TLS("ca.pem", cert_file="client.pem", key_file="client.key")   # mutual TLS (--grpc-use-ssl-mutual)

The server's certificate is always verified, its name included: there is no switch to skip it. Triton's own
gRPC endpoint speaks TLS (tritonserver --grpc-use-ssl ...); its HTTP endpoint does not, so HTTPS is an ingress
or proxy in front of it. `tls_for` picks the TLS of a URL: an https:// or grpcs:// one turns TLS on.
"""
from __future__ import annotations

import dataclasses
import ssl

from clients.endpoint import url_tls

ALPN = {"http": ["http/1.1"], "grpc": ["h2"]}  # what each protocol speaks over TLS (tritonclient's aiohttp: 1.1)


@dataclasses.dataclass(frozen=True)
class TLS:
    ca_file: str | None = None  # PEM CA certificates to verify the server against; None: the system's
    cert_file: str | None = None  # PEM client certificate (chain), for mutual TLS, with its key
    key_file: str | None = None

    def __post_init__(self):
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("a client certificate needs both --tls-cert FILE and --tls-key FILE, its private key")

    def context(self, protocol: str) -> ssl.SSLContext:
        """A client context that verifies the server (name included) and presents the client certificate; a file
        that cannot be read or holds no usable PEM is a ValueError naming it."""
        for flag, path in (("--tls-ca", self.ca_file), ("--tls-cert", self.cert_file), ("--tls-key", self.key_file)):
            if path is not None:
                _check_readable(flag, path)
        try:
            context = ssl.create_default_context(cafile=self.ca_file)
        except ssl.SSLError as exc:
            raise ValueError(f"--tls-ca {self.ca_file}: no PEM CA certificate there ({exc.reason or exc})") from None
        if self.cert_file is not None:
            try:
                context.load_cert_chain(self.cert_file, self.key_file)
            except ssl.SSLError as exc:
                raise ValueError(f"--tls-cert {self.cert_file} --tls-key {self.key_file}: not a PEM certificate and "
                                 f"its private key ({exc.reason or exc})") from None
        context.set_alpn_protocols(ALPN[protocol])
        return context

    def client_options(self, protocol: str, asynchronous: bool) -> dict:
        """The arguments of tritonclient's InferenceServerClient (`protocol`, sync or asyncio) for this TLS."""
        if protocol == "grpc":  # sync and aio alike: file paths, read by tritonclient
            return {"ssl": True, "root_certificates": self.ca_file, "private_key": self.key_file,
                    "certificate_chain": self.cert_file}
        if asynchronous:
            return {"ssl": True, "ssl_context": self.context(protocol)}
        import gevent.ssl

        files = {"ca_certs": self.ca_file, "certfile": self.cert_file, "keyfile": self.key_file}
        return {"ssl": True, "ssl_options": {k: v for k, v in files.items() if v is not None},
                "ssl_context_factory": gevent.ssl.create_default_context, "insecure": False}


def _check_readable(flag: str, path: str) -> None:
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise ValueError(f"{flag} {path}: cannot read it ({exc.strerror or exc})") from None


def tls_for(url: str | None, tls: TLS | None) -> TLS | None:
    """The TLS of a client of `url`: `tls`, else the system's CAs for an https:// or grpcs:// URL; a ValueError for
    TLS settings with a URL that says plain (http://, grpc://)."""
    scheme_tls = url_tls(url) if url else None
    if tls is not None and scheme_tls is False:
        raise ValueError(f"URL {url!r} says no TLS, but TLS was asked for (--tls, --tls-ca, --tls-cert): use the "
                         "URL's https:// or grpcs:// form")
    return tls or (TLS() if scheme_tls else None)
