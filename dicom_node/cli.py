"""The ``dicom-node`` command.

Exit statuses: 0 success; 1 failure; 2 bad arguments or configuration; 3 study skipped.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicom_node import __version__
from dicom_node.config import Config, load_config
from dicom_node.errors import ConfigError, JobStoreError, NodeError

if TYPE_CHECKING:
    from dicom_node.dispatch.scu import Peer

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_SKIPPED = 0, 1, 2, 3


class UsageError(Exception):
    """A command's arguments are wrong (exit status 2)."""


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        help="YAML configuration (default: $DICOM_NODE_CONFIG, else the embedded defaults)",
    )
    p.add_argument("--data-dir", type=Path, default=None, help="overrides storage.data_dir")


def _count(text: str) -> int:
    """An argument that counts something: 0 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


def _parser() -> argparse.ArgumentParser:  # noqa: PLR0915 - every command's flags, in one place
    parser = argparse.ArgumentParser(
        prog="dicom-node", description="A DICOM node that runs a lung-CT AI model."
    )
    parser.add_argument("--version", action="version", version=f"dicom-node {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="receive studies, analyse them, send the results")
    _config_args(serve)
    serve.add_argument("--port", type=int, default=None, help="overrides node.port")
    serve.add_argument("--ae-title", default=None, help="overrides node.ae_title")

    check = sub.add_parser("check-config", help="validate a configuration file and exit")
    check.add_argument("path", type=Path, nargs="?", default=None)

    jobs = sub.add_parser("jobs", help="list studies and jobs with their states")
    _config_args(jobs)
    jobs.add_argument("--json", action="store_true", help="machine-readable output")
    jobs.add_argument(
        "--limit",
        type=_count,
        default=50,
        metavar="N",
        help="the N newest jobs and their deliveries (default 50; 0: all); deliveries not"
        " yet delivered are listed whatever their job",
    )

    retry = sub.add_parser("retry", help="re-queue a dead (or failed) job")
    _config_args(retry)
    retry.add_argument("job", type=int)
    analyze = sub.add_parser(
        "analyze", help="analyse a study from files; write findings and results"
    )
    _config_args(analyze)
    analyze.add_argument(
        "inputs", type=Path, nargs="+", metavar="INPUT", help="DICOM files or folders"
    )
    analyze.add_argument("--out", type=Path, default=Path("analysis-out"), help="output folder")
    analyze.add_argument(
        "--model", type=Path, default=None, help="model folder (overrides model.path)"
    )
    analyze.add_argument("--json", action="store_true", help="print the findings as JSON")

    purge = sub.add_parser("purge", help="delete the inputs and outputs of dead jobs")
    _config_args(purge)
    purge.add_argument(
        "--older-than",
        type=float,
        default=0.0,
        metavar="HOURS",
        help="only jobs that died at least this long ago",
    )

    send = sub.add_parser("send", help="C-STORE files to a configured destination now")
    _config_args(send)
    send.add_argument("files", type=Path, nargs="+", help="DICOM files or folders")
    send.add_argument("--to", required=True, metavar="NAME", help="a destination's name")

    echo = sub.add_parser("echo", help="C-ECHO a configured destination")
    _config_args(echo)
    echo.add_argument("name", help="a destination's name")

    train = sub.add_parser("train", help="train the lung-CT model (see docs/training.md)")
    _dataset_args(train, first_seed=0, count=300, shift=0.0, tumour_probability=0.6, widen=1.0)
    train.add_argument("--output", type=Path, required=True, help="model folder to write")
    train.add_argument("--work-dir", type=Path, default=None, help="checkpoints, log, cache")
    train.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    train.add_argument("--max-minutes", type=float, default=None, help="wall-clock budget")
    train.add_argument("--val-fraction", type=float, default=0.15)
    train.add_argument("--test-fraction", type=float, default=0.0)
    train.add_argument("--encoder", default="resnet50", help="resnet18/34/50/101/152")
    train.add_argument("--encoder-weights", type=Path, default=None, help="local ResNet state dict")
    train.add_argument(
        "--mlp-pooling",
        choices=("lesion", "average"),
        default="lesion",
        help="what the MLP reads from the encoder (see docs/training.md)",
    )
    train.add_argument(
        "--mlp-context-mm",
        type=float,
        default=2.5,
        help="the MLP also reads the slices this many mm before and after (0: the slice alone)",
    )
    train.add_argument(
        "--from-model",
        type=Path,
        default=None,
        help="take this model's segmentation network, skip stage 1, fit the MLP anew",
    )
    train.add_argument(
        "--keep-mlp",
        action="store_true",
        help="with --from-model: keep its MLP too and train nothing; only choose the operating"
        " points (image and study thresholds, lesion rule) anew on the validation cases",
    )
    train.add_argument(
        "--fine-tune",
        action="store_true",
        help="with --from-model: train its segmentation network further (--seg-steps at"
        " --seg-lr, from its weights; on this run's grid, which may differ from the model's),"
        " then fit the MLP and operating points anew",
    )
    train.add_argument(
        "--seg-lr",
        type=float,
        default=1e-3,
        help="stage-1 peak learning rate (AdamW); lower it when fine-tuning, e.g. 2e-4",
    )
    train.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="auto: bf16 on CUDA and on CPUs with bf16 instructions",
    )
    train.add_argument("--input-size", type=int, default=256)
    train.add_argument("--pixel-spacing", type=float, default=1.5, help="mm; 0: mode fit")
    train.add_argument(
        "--context-mm",
        type=float,
        default=0.0,
        help="2.5-D input: planes this many mm before and after each slice (0: the slice alone)",
    )
    train.add_argument(
        "--seg-scales",
        type=float,
        nargs="+",
        default=[1.0],
        metavar="S",
        help="test-time scales of the segmentation, 1 among them (e.g. 1 1.25: the mean of the "
        "logits on the slice and on it magnified by 1.25); the operating points are chosen "
        "with them and the card keeps them",
    )
    train.add_argument("--crop", type=int, default=128)
    train.add_argument(
        "--lesion-fraction",
        type=float,
        default=0.0,
        help="share of tumour-centred crops drawn tumour first, every tumour equally likely",
    )
    train.add_argument(
        "--crop-dice",
        type=float,
        default=0.0,
        help="weight of the per-crop Dice in the loss (the rest: Dice of the whole batch)",
    )
    train.add_argument("--batch-size", type=int, default=8)
    train.add_argument("--seg-steps", type=int, default=3000)
    train.add_argument("--cls-epochs", type=int, default=200)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--name", default="lung-ct-unet-resnet50")
    train.add_argument("--model-version", default="0.2.4")

    evaluate = sub.add_parser("evaluate", help="score a model on a dataset; JSON + PNG report")
    _dataset_args(evaluate, first_seed=100000, count=40, shift=0.5, tumour_probability=0.5)
    evaluate.add_argument("--model", type=Path, required=True, help="model folder")
    evaluate.add_argument("--out", type=Path, default=Path("evaluation"), help="output folder")
    evaluate.add_argument("--split-name", default="test", help="split to score with --split")
    evaluate.add_argument("--baseline", action="store_true", help="also a scikit-learn model")
    evaluate.add_argument("--train-first-seed", type=int, default=0)
    evaluate.add_argument("--train-phantoms", type=int, default=300)
    evaluate.add_argument("--train-shift", type=float, default=0.0)
    evaluate.add_argument("--train-widen", type=float, default=1.0)
    evaluate.add_argument("--train-tumour-probability", type=float, default=0.6)
    evaluate.add_argument(
        "--train-split", type=Path, default=None, help="phantoms: keep only its training cases"
    )
    evaluate.add_argument(
        "--train-eval-cases",
        type=int,
        default=20,
        help="training cases scored for train vs held-out",
    )
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--cache-dir", type=Path, default=None, help="keep phantoms here")
    evaluate.add_argument(
        "--write-card", type=Path, default=None, help="write the model with held-out figures here"
    )
    evaluate.add_argument(
        "--config",
        type=Path,
        default=None,
        help="score the lesions as a node with this configuration reports them (its lesions"
        " section and inference.seg_scales; default: the model card's)",
    )
    return parser


def _dataset_args(
    p: argparse.ArgumentParser,
    *,
    first_seed: int,
    count: int,
    shift: float,
    tumour_probability: float,
    widen: float = 0.0,
) -> None:
    p.add_argument("--dataset", choices=("phantoms", "msd", "dicom-seg"), default="phantoms")
    p.add_argument("--data", type=Path, default=None, help="folder (msd, dicom-seg)")
    p.add_argument("--split", type=Path, default=None, help="patient-level split JSON file")
    p.add_argument(
        "--segment-labels",
        default=None,
        metavar="REGEX",
        help="dicom-seg: take the SEG segments whose whole label matches this (case insensitive),"
        " in place of those coded as tumour (neoplasm, mass, nodule...)",
    )
    p.add_argument("--first-seed", type=int, default=first_seed, help="phantoms: first seed")
    p.add_argument("--phantoms", type=int, default=count, help="phantoms: how many")
    p.add_argument(
        "--phantom-shape", type=int, nargs=3, default=(32, 256, 256), metavar=("Z", "Y", "X")
    )
    p.add_argument(
        "--phantom-matrix",
        type=int,
        nargs="+",
        default=(),
        metavar="N",
        help="phantoms: render each on one of these in-plane matrices, by seed (e.g. 256 512),"
        " in place of --phantom-shape's rows and columns",
    )
    p.add_argument("--shift", type=float, default=shift, help="phantoms: site shift amount")
    p.add_argument(
        "--widen",
        type=float,
        default=widen,
        help="phantoms: widen every site range by this many widths (domain randomisation)",
    )
    p.add_argument("--tumour-probability", type=float, default=tumour_probability)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda[:N]")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes that load or generate cases (default: one per core, at most 8)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _train(args: argparse.Namespace) -> int:
    from dicom_node.training.train import config_from_args, run_from_args

    try:
        config = config_from_args(args)
    except ValueError as exc:
        raise UsageError(f"these training settings do not fit together: {exc}") from exc
    return run_from_args(args, config)


def _evaluate(args: argparse.Namespace) -> int:
    from dicom_node.training.evaluate import run_from_args

    if args.config is not None and args.write_card is not None:
        # the card's figures describe the card's own lesion rule
        raise UsageError("--write-card scores the card's own lesion rule: leave out --config")
    if args.dataset != "phantoms" and args.split is None:
        # without a split every case of the folder is scored, those trained on included
        if args.write_card is not None:
            raise UsageError(
                f"--write-card on {args.dataset} data needs --split: without it every case is"
                " scored as held out, the training cases too"
            )
        if args.baseline:
            raise UsageError(
                f"--baseline on {args.dataset} data needs --split: its training cases come"
                " from the split"
            )
    return run_from_args(args)


class _ProgressBar:
    """A terminal progress bar over the slices the model has done (tqdm, on stderr)."""

    def __init__(self) -> None:
        self._bar: Any = None

    def __call__(self, label: str, done: int, total: int) -> None:
        from tqdm import tqdm

        if self._bar is None or self._bar.total != total:
            self.close()
            self._bar = tqdm(total=total, desc=label, unit="slice", file=sys.stderr)
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _dicom_files(inputs: Sequence[Path]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        if item.is_dir():
            files.extend(sorted(p for p in item.rglob("*") if p.is_file()))
        elif item.is_file():
            files.append(item)
        else:
            raise UsageError(f"{item}: no such file or folder")
    if not files:
        raise UsageError("no files found in the inputs")
    return files


def _analyze(args: argparse.Namespace) -> int:
    from dicom_node.analysis.pipeline import AnalysisPipeline
    from dicom_node.errors import StudySkipped
    from dicom_node.logs import setup_logging

    config = _load(args)
    setup_logging(config.logging.model_copy(update={"level": "WARNING", "format": "console"}))
    if args.model is not None:
        config = config.model_copy(
            update={"model": config.model.model_copy(update={"path": args.model})}
        )
    files = _dicom_files(args.inputs)
    progress = sys.stderr.isatty()
    if progress:
        print(f"loading the model; {len(files)} files to read", file=sys.stderr)
    pipeline = AnalysisPipeline(config)
    # torch, highdicom and the model (~500k objects) live until exit: out of the cyclic
    # collector's full passes (~0.4 s of them in a 300-slice study on the 2-core machine)
    gc.freeze()
    args.out.mkdir(parents=True, exist_ok=True)
    bar = _ProgressBar() if progress else None
    try:
        findings = pipeline.analyse(files, out_dir=args.out, progress=bar)
    except StudySkipped as exc:
        print(f"dicom-node: skipped: {exc}", file=sys.stderr)
        return EXIT_SKIPPED
    finally:
        if bar is not None:
            bar.close()
    summary = findings.summary()
    (args.out / "findings.json").write_text(json.dumps(summary, indent=2))
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for note in findings.not_analysed:
            print(f"not analysed: {note}")
        for f in findings.series:
            verdict = "cancerous" if f.study_positive else "non-cancerous"
            print(
                f"{f.label}: {f.slices} slices, {len(f.lesions)} lesion(s), study probability"
                f" {f.study_probability:.3f} ({verdict} at threshold {f.threshold:.2f})"
            )
            for les in f.lesions:
                print(
                    f"  lesion {les.label}: {les.volume_mm3:.0f} mm3, {les.long_axis_mm:.1f} x"
                    f" {les.short_axis_mm:.1f} mm, mean {les.mean_hu:.0f} HU, slices"
                    f" {les.first_slice}-{les.last_slice}"
                )
            for path in f.outputs:
                print(f"  wrote {path}")
    return EXIT_OK


def _peer(config: Config, name: str) -> Peer:
    from dicom_node.dispatch.routing import resolve

    peer = resolve(config, name)
    if peer is None:
        known = ", ".join(d.name for d in config.destinations) or "none"
        raise UsageError(f"no destination named {name!r} (configured: {known})")
    return peer


def _send(args: argparse.Namespace) -> int:
    from dicom_node.dispatch.scu import send_files

    config = _load(args)
    peer = _peer(config, args.to)
    files = _dicom_files(args.files)
    outcomes = send_files(peer, files, calling_ae=config.node.ae_title, settings=config.dispatch)
    for o in outcomes:
        print(f"{'ok ' if o.delivered else 'FAILED'} {o.path}: {o.detail}")
    failed = sum(not o.delivered for o in outcomes)
    print(f"{len(outcomes) - failed} of {len(outcomes)} delivered to {peer.name}")
    return EXIT_FAILED if failed else EXIT_OK


def _echo(args: argparse.Namespace) -> int:
    from dicom_node.dispatch.scu import echo

    config = _load(args)
    peer = _peer(config, args.name)
    ok, detail = echo(peer, calling_ae=config.node.ae_title, settings=config.dispatch)
    print(f"{peer.name} ({peer.ae_title}@{peer.host}:{peer.port}): {detail}")
    return EXIT_OK if ok else EXIT_FAILED


def _load(args: argparse.Namespace) -> Config:
    path: Path | None = getattr(args, "config", None)
    if path is None and os.environ.get("DICOM_NODE_CONFIG"):
        path = Path(os.environ["DICOM_NODE_CONFIG"])
    overrides: dict[str, Any] = {}
    if getattr(args, "port", None) is not None:
        overrides.setdefault("node", {})["port"] = args.port
    if getattr(args, "ae_title", None) is not None:
        overrides.setdefault("node", {})["ae_title"] = args.ae_title
    if getattr(args, "data_dir", None) is not None:
        overrides.setdefault("storage", {})["data_dir"] = str(args.data_dir)
    return load_config(path, overrides=overrides)


def _serve(args: argparse.Namespace) -> int:
    from dicom_node.logs import setup_logging
    from dicom_node.preflight import preflight
    from dicom_node.service import Node, ignore_hangups

    config = _load(args)
    setup_logging(config.logging)
    ignore_hangups()  # also while the analysis process loads the model
    # what the node writes (spool, job store, results: patient data) is not for every user,
    # as the unit's UMask=0027 has it, however the node is started
    os.umask(os.umask(0o027) | 0o027)
    preflight(config, analysis=False)  # the analysis process checks its device as it starts
    return Node(config).serve_forever()


def _check_config(args: argparse.Namespace) -> int:
    path = args.path
    if path is None and os.environ.get("DICOM_NODE_CONFIG"):
        path = Path(os.environ["DICOM_NODE_CONFIG"])
    from dicom_node.preflight import preflight, unresolved_peers

    config = load_config(path)
    preflight(config, analysis=True)
    for warning in unresolved_peers(config):
        print(f"warning: {warning}", file=sys.stderr)
    print(f"{path or 'embedded defaults'}: valid")
    return EXIT_OK


def _jobs(args: argparse.Namespace) -> int:
    from dicom_node.listing import render
    from dicom_node.service import open_store
    from dicom_node.store.jobs import SETTLED_STATES, JobState
    from dicom_node.store.outbox import Outbox

    config = _load(args)
    store = open_store(config, read_only=True)

    newest = store.jobs(limit=args.limit or None)
    # jobs an operator may have to act on are listed whatever their age
    unsettled = store.jobs([s for s in JobState if s not in SETTLED_STATES])
    jobs = sorted({j.id: j for j in (*newest, *unsettled)}.values(), key=lambda j: -j.id)
    counts = store.counts()
    studies = store.studies()
    deliveries = Outbox(store, config.dispatch).listing([j.id for j in jobs])
    if args.json:
        out = {
            "studies": [asdict(s) for s in studies],
            "jobs": [asdict(j) for j in jobs],
            "counts": counts,
            "deliveries": [asdict(d) for d in deliveries],
        }
        print(json.dumps(out, indent=2, default=str))
        return EXIT_OK
    print(render(studies, jobs, deliveries))
    left_out = sum(counts.values()) - len(jobs)
    if left_out:
        print(f"\n{left_out} older settled job(s) not listed (--limit 0 lists every job)")
    return EXIT_OK


def _purge(args: argparse.Namespace) -> int:
    from dicom_node.service import open_store
    from dicom_node.store.retention import purge
    from dicom_node.store.spool import Spool

    config = _load(args)
    data = config.storage.data_dir
    removed = purge(
        open_store(config),
        Spool(data / "spool", min_free_bytes=0),
        data / "work",
        older_than_hours=args.older_than,
    )
    print(f"purged {removed.studies} dead studies ({removed.files} spooled files)")
    return EXIT_OK


def _retry(args: argparse.Namespace) -> int:
    from dicom_node.dispatch.routing import resolve
    from dicom_node.service import open_store
    from dicom_node.store.jobs import JobState
    from dicom_node.store.outbox import DeliveryState, Outbox

    config = _load(args)
    store = open_store(config)
    gone = sorted(
        {
            d.destination
            for d in Outbox(store, config.dispatch).items(args.job)
            if d.state == DeliveryState.DEAD and resolve(config, d.destination) is None
        }
    )
    if gone:
        raise JobStoreError(
            f"job {args.job}: its dead deliveries go to {', '.join(map(repr, gone))}, no longer"
            " configured: configure the destination again (or send the files with dicom-node"
            " send --to NAME) to deliver them"
        )
    job = store.retry_job(args.job)
    if job.state == JobState.SENDING:
        print(f"job {job.id}: its dead deliveries are sent again (study version {job.version})")
    else:
        print(f"job {job.id} queued again (study version {job.version})")
    return EXIT_OK


_COMMANDS = {
    "serve": _serve,
    "check-config": _check_config,
    "jobs": _jobs,
    "retry": _retry,
    "send": _send,
    "analyze": _analyze,
    "purge": _purge,
    "echo": _echo,
    "train": _train,
    "evaluate": _evaluate,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except ConfigError as exc:
        print(f"dicom-node: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except UsageError as exc:
        print(f"dicom-node: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except JobStoreError as exc:
        print(f"dicom-node: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except NodeError as exc:
        print(f"dicom-node: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        print(f"dicom-node: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
