"""Start-up checks that need no port: what ``serve`` would refuse, found before it starts.

``dicom-node check-config`` runs them all (install.sh relies on it before restarting the
service); ``serve`` runs the cheap ones in the receiving process before it spawns the analysis
process, which then checks the device and precision as it loads the model.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path

from dicom_node.config import Config, known_peer_tls_key, resolve_model_path
from dicom_node.errors import ConfigError
from dicom_node.receive.tls import client_context, server_context

__all__ = [
    "check_addresses",
    "check_model_folder",
    "check_tls",
    "preflight",
    "unresolved_peers",
]

logger = logging.getLogger(__name__)


def check_model_folder(config: Config) -> Path | None:
    """The model folder ``model.path`` names, found as the node finds it (``None`` in
    receive-only mode).

    Raises
    ------
    ConfigError
        The folder does not exist.
    """
    if config.model.path is None:
        return None
    path = resolve_model_path(config.model.path)
    if not path.is_dir():
        raise ConfigError(f"model.path: {str(config.model.path)!r} is not a folder here")
    return path


def check_addresses(config: Config) -> None:
    """The host names the node listens on resolve.

    Raises
    ------
    ConfigError
        ``node.host`` or ``service.http_host`` (when the HTTP endpoint is on) does not.
    """
    hosts = [("node.host", config.node.host)]
    if config.service.http_port:
        hosts.append(("service.http_host", config.service.http_host))
    for key, host in hosts:
        try:
            socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except socket.gaierror as exc:
            raise ConfigError(f"{key}: {host!r} does not resolve ({exc.strerror})") from exc


def unresolved_peers(config: Config) -> list[str]:
    """The destinations and known peers whose host does not resolve now, each as a sentence
    naming its key. Not an error: a name server may be out of reach for now, and results wait
    in the outbox until it resolves; but a misspelt host is better heard at once."""
    peers = [(f"destinations[{d.name}].host", d.host) for d in config.destinations]
    peers += [
        (f"dispatch.known_peers[{p.ae_title.strip()}].host", p.host)
        for p in config.dispatch.known_peers
    ]
    found = []
    for key, host in peers:
        try:
            socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            found.append(
                f"{key}: {host!r} does not resolve ({exc.strerror}); results for it wait in"
                " the outbox until it does"
            )
    return found


def check_tls(config: Config) -> None:
    """The certificates and keys of the listener and of each destination load.

    Raises
    ------
    ConfigError
        One does not (the message names its key).
    """
    if config.node.tls is not None:
        server_context(config.node.tls)
    for destination in config.destinations:
        if destination.tls is not None:
            client_context(destination.tls, where=f"destinations[{destination.name}].tls")
    for peer in config.dispatch.known_peers:
        if peer.tls is not None:
            client_context(peer.tls, where=known_peer_tls_key(peer))


def preflight(config: Config, *, analysis: bool) -> None:
    """Every check above; with ``analysis``, also the model card and the device and precision
    it would run with (this imports torch).

    Raises
    ------
    ConfigError
        A setting ``serve`` would refuse.
    ModelError
        The model folder holds no valid card.
    """
    check_addresses(config)
    check_tls(config)
    folder = check_model_folder(config)
    if folder is None or not analysis:
        return
    from dicom_node.analysis.inference import resolve_device, resolve_precision
    from dicom_node.analysis.weights import CARD_FILE, TORCH_DTYPES, read_card

    read_card(folder / CARD_FILE)
    device = resolve_device(config.inference.device)
    resolve_precision(config.inference.precision, device, TORCH_DTYPES[config.model.dtype])
    logger.debug("preflight: model card, device %s and precision accepted", device)
