"""Scale-out with Ray Data: the corpus as a Ray Dataset of shard windows, one actor per GPU holding the model.

``pip install 'attnscope[distributed]'``. The driver takes the run directory's lock, cuts the corpus into the same
shard windows as a single-process run (``run.shard_windows``), skips the prompts a resumed run already holds, and
gives each window its shard name and first prompt number in advance. ``Dataset.map_batches`` runs ``ShardActor``:
each actor loads the model once (``num_gpus=1``; CPU actors on a machine without GPUs), tokenises and profiles a
window, and writes the shard's files itself under the run's ``.staging/`` (Parquet tables and vectors: nothing
in them depends on the shards before it). It sends back only the shard's accumulators. The driver commits the
shards in corpus order (``preserve_order``): it renames the staged files into place and reduces the accumulators,
so a Ray run has exactly the format of a single-process run, and equals it number for number when both use the
same CPU thread count (``--threads``: how threads split a float sum changes its last bits). An actor on a node
that does not see the run directory (no shared filesystem) sends the whole shard back and the driver writes it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import uuid
from pathlib import Path

__all__ = ["ShardActor", "profile_with_ray"]


class ShardActor:
    """A Ray Data actor: loads the model once, then profiles each window of prompts into a shard.

    ``run_dir``/``token``: the run directory and the name of the marker file the driver put in its ``.staging/``.
    Where the actor sees that marker it writes the shard's files there and returns the accumulators; elsewhere it
    returns the whole pickled ``Shard``.
    """

    def __init__(
        self,
        model: str | None,
        device: str,
        dtype: str,
        config: dict,
        threads: int = 0,
        run_dir: str | None = None,
        token: str | None = None,
    ):
        from attnscope.kernels import set_cpu_threads

        from .config import ProfileConfig
        from .engine import Engine
        from .models import load_model
        from .store import STAGING

        if threads:
            set_cpu_threads(threads)  # torch and the Numba pass
        self.model, self.tok, _ = load_model(model, device=device, dtype=dtype)
        self.model.eval()
        cfg = ProfileConfig(**config)
        self.engine = Engine(self.model, self.tok, cfg)
        self.staging = Path(run_dir) / STAGING if run_dir and token else None
        if self.staging is not None and not (self.staging / token).is_file():
            self.staging = None  # another node without the run directory: the driver writes the shards

    def __call__(self, batch: dict) -> dict:
        from .run import PromptItem
        from .store import write_shard_files

        out: dict[str, list] = {"shard": [], "accum": [], "files": [], "n_tokens": [], "meta": []}
        # per window its rows' spans as JSON ("": none; a batch without the field: no spans)
        spans_of = batch["spans"] if "spans" in batch else [[""] * len(ids) for ids in batch["ids"]]
        for first, name, prompt0, ids, texts, spans in zip(
            batch["first"], batch["name"], batch["prompt0"], batch["ids"], batch["texts"], spans_of
        ):
            items = [PromptItem(str(i), str(t), _loads_spans(str(sp))) for i, t, sp in zip(ids, texts, spans)]
            tokens = self.engine.tokenize(items, int(first))
            shard = self.engine.run_shard(items, tokens)
            meta = self.engine.meta()
            if self.staging is not None:
                files = write_shard_files(self.staging, str(name), shard, int(prompt0), meta)
                out["shard"].append(b"")
                out["accum"].append(pickle.dumps(shard.accum, protocol=5))
            else:
                files = []
                out["shard"].append(pickle.dumps(shard, protocol=5))
                out["accum"].append(b"")
            out["files"].append(files)
            out["n_tokens"].append(shard.n_tokens)
            out["meta"].append(pickle.dumps(meta, protocol=5))
        return out


def _dumps_spans(spans: dict | None) -> str:
    """A prompt's named character spans as they travel to an actor: JSON, or "" for none."""
    return json.dumps(spans) if spans else ""


def _loads_spans(s: str) -> dict | None:
    return {k: [tuple(p) for p in v] for k, v in json.loads(s).items()} if s else None


def _config_kwargs(cfg) -> dict:
    kw = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    kw["progress"] = False
    return kw


def profile_with_ray(args, corpus, cfg, writer, total: int, address: str | None = None) -> tuple[int, int, int]:
    """Profile ``corpus`` on a Ray cluster into ``writer``'s run directory; returns the prompts profiled, the shards
    committed, and how many of those the actors wrote themselves (the others, from nodes that do not see the run
    directory, the driver wrote).

    ``address``: a cluster to join (``ray://host:10001`` or ``host:6379``), or None for a local one (``ray.init()``
    with this machine's CPUs and GPUs, or the cluster ``RAY_ADDRESS`` names).
    """
    try:
        import ray
    except ImportError:
        from .store import RunError

        raise RunError("--ray needs Ray Data: pip install 'attnscope[distributed]'") from None
    from tqdm.auto import tqdm

    from .run import shard_windows
    from .store import STAGING, RunError, is_run, next_seq, read_manifest, shard_name

    writer.acquire()  # held until the end: no other writer while the actors write into the directory
    try:
        base = read_manifest(writer.path) if writer.mode in ("resume", "append") and is_run(writer.path) else None
        skip = writer.prompts_to_skip(iter(corpus), getattr(args, "skip_existing", False))
        seq, prompt0 = next_seq(base), int(base["n_prompts"]) if base else 0
        rows = []
        for first, window in shard_windows(iter(corpus), cfg):
            todo = [it for it in window if it.id not in skip]
            if todo:
                rows.append(
                    {"first": first, "name": shard_name(seq), "prompt0": prompt0}
                    | {"ids": [it.id for it in todo], "texts": [it.text for it in todo]}
                    | {"spans": [_dumps_spans(it.spans) for it in todo]}  # a suite's or a corpus's named spans
                )
                seq, prompt0 = seq + 1, prompt0 + len(todo)
        if not rows:  # a resumed run that had committed every prompt: only its status is left to write
            writer.meta = dict(base["meta"])
            writer.open()
            writer.close(complete=True)
            return 0, 0, 0
        token = f"run-{uuid.uuid4().hex}"
        staging = writer.path / STAGING
        staging.mkdir(exist_ok=True)
        (staging / token).write_text(f"{os.getpid()}\n")

        address = address if address is not None else (args.ray or None)
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # shards come back in corpus order
        n_actors = min(len(rows), gpus if gpus else cpus)
        ds = ray.data.from_items(rows, override_num_blocks=len(rows))
        kw = dict(
            fn_constructor_kwargs={
                "model": args.model,
                "device": args.device if gpus else "cpu",
                "dtype": args.dtype,
                "config": _config_kwargs(cfg),
                "threads": cfg.threads or (0 if gpus else max(1, cpus // n_actors)),
                "run_dir": str(writer.path.resolve()),
                "token": token,
            },
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=n_actors),  # one model per actor, a fixed pool
            batch_format="default",
        )
        kw["num_gpus" if gpus else "num_cpus"] = 1 if gpus else max(1, cpus // n_actors)
        results = ds.map_batches(ShardActor, **kw)
        done = shards = staged = 0
        bar = tqdm(total=total, desc="profile", unit="prompt", disable=args.no_progress, dynamic_ncols=True)
        bar.update(total - sum(len(r["ids"]) for r in rows))
        try:
            for row, res in zip(rows, results.iter_rows()):
                if writer.doc is None:  # the run's identity is known once an actor has loaded the model
                    writer.meta = pickle.loads(res["meta"])
                    writer.open()
                    if writer.next_shard != (rows[0]["name"], rows[0]["prompt0"]):
                        raise RunError(f"{writer.path} changed while the shards were being assigned")
                n = len(row["ids"])
                files = list(res["files"]) if res["files"] is not None else []
                if files:
                    accum = pickle.loads(res["accum"])
                    writer.commit_staged(row["name"], row["prompt0"], n, int(res["n_tokens"]), files, accum)
                    staged += 1
                else:
                    writer.commit(pickle.loads(res["shard"]))
                shards += 1
                done += n
                bar.update(n)
        finally:
            bar.close()
    except BaseException:
        writer.close(complete=False)  # what is committed stays (--resume continues); the staged files go
        raise
    writer.close(complete=True)
    return done, shards, staged
