"""Where a job's results go: the configured destinations, and the sender when it is a known peer."""

from __future__ import annotations

from collections.abc import Iterable

from dicom_node.config import Config, known_peer_tls_key
from dicom_node.dispatch.scu import Peer

REPLY_PREFIX = "reply:"


def destinations_for(config: Config, calling_aes: Iterable[str]) -> list[str]:
    """Destination names for a study sent by ``calling_aes``.

    Every configured destination, plus (with ``dispatch.reply_to_sender``) ``reply:<AE>`` for
    each calling AE found in ``dispatch.known_peers``. An unknown caller is never replied to.
    """
    names = [d.name for d in config.destinations]
    if config.dispatch.reply_to_sender:
        known = {p.ae_title.strip() for p in config.dispatch.known_peers}
        configured = {(d.ae_title.strip()) for d in config.destinations}
        for ae in sorted({a.strip() for a in calling_aes}):
            if ae in known and ae not in configured:
                names.append(REPLY_PREFIX + ae)
    return names


def resolve(config: Config, name: str) -> Peer | None:
    """The peer behind a destination name, or ``None`` when the configuration no longer has it."""
    if name.startswith(REPLY_PREFIX):
        ae = name.removeprefix(REPLY_PREFIX)
        for p in config.dispatch.known_peers:
            if p.ae_title.strip() == ae:
                return Peer(
                    name=name,
                    ae_title=p.ae_title,
                    host=p.host,
                    port=p.port,
                    tls=p.tls,
                    tls_key=known_peer_tls_key(p),
                )
        return None
    for d in config.destinations:
        if d.name == name:
            return Peer(name=d.name, ae_title=d.ae_title, host=d.host, port=d.port, tls=d.tls)
    return None
