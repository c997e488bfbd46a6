"""Where results go: configured destinations, and the sender only when it is a known peer."""

from __future__ import annotations

from dicom_node.config import load_config
from dicom_node.dispatch.routing import destinations_for, resolve


def test_reply_to_sender_only_for_known_peers() -> None:
    """reply_to_sender adds the calling AE's known address; an unknown caller gets nothing;
    a caller that already is a destination is not sent twice."""
    cfg = load_config(
        None,
        overrides={
            "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "10.0.0.1", "port": 104}],
            "dispatch": {
                "reply_to_sender": True,
                "known_peers": [
                    {"ae_title": "CT_SCANNER", "host": "10.0.0.7", "port": 11112},
                    {"ae_title": "PACS", "host": "10.0.0.1", "port": 104},
                ],
            },
        },
    )
    names = destinations_for(cfg, {"CT_SCANNER", "STRANGER", "PACS"})
    assert names == ["pacs", "reply:CT_SCANNER"]
    peer = resolve(cfg, "reply:CT_SCANNER")
    assert peer is not None
    assert (peer.ae_title, peer.host, peer.port) == ("CT_SCANNER", "10.0.0.7", 11112)
    assert resolve(cfg, "reply:STRANGER") is None
    assert resolve(cfg, "gone") is None
    off = load_config(None, overrides={"destinations": []})
    assert destinations_for(off, {"CT_SCANNER"}) == []
