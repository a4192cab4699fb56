"""Scale-out with Ray Data: the corpus as a Ray Dataset of shard windows, one actor per GPU holding the model.

``pip install 'attnscope[distributed]'``. The driver cuts the corpus into the same shard windows as a
single-process run (``run.shard_windows``), skips the prompts a resumed run already holds, and hands the windows
to ``Dataset.map_batches`` with ``ShardActor``: each actor loads the model once (``num_gpus=1``; CPU actors on a
machine without GPUs), tokenises and profiles a window into a ``Shard``. The driver receives the shards in corpus
order (``preserve_order``) and commits them with the same ``RunWriter``, so a Ray run is byte for byte the format
of a single-process run, and equal to it number for number when both use the same CPU thread count (``--threads``:
how threads split a float sum changes its last bits).
"""

from __future__ import annotations

import dataclasses
import pickle

__all__ = ["ShardActor", "profile_with_ray"]


class ShardActor:
    """A Ray Data actor: loads the model once, then turns each window of prompts into a pickled ``Shard``."""

    def __init__(self, model: str | None, device: str, dtype: str, config: dict, threads: int = 0):
        from attnscope.kernels import set_cpu_threads

        from .models import load_model
        from .run import ProfileConfig, _Engine

        if threads:
            set_cpu_threads(threads)  # torch and the Numba pass
        self.model, self.tok, _ = load_model(model, device=device, dtype=dtype)
        self.model.eval()
        cfg = ProfileConfig(**config)
        self.engine = _Engine(self.model, self.tok, cfg)

    def __call__(self, batch: dict) -> dict:
        from .run import PromptItem

        out_meta, out_shard = [], []
        for first, ids, texts in zip(batch["first"], batch["ids"], batch["texts"]):
            items = [PromptItem(str(i), str(t)) for i, t in zip(ids, texts)]
            tokens = self.engine.tokenize(items, int(first))
            shard = self.engine.run_shard(items, tokens)
            out_shard.append(pickle.dumps(shard, protocol=5))
            out_meta.append(pickle.dumps(self.engine.meta(), protocol=5))
        return {"shard": out_shard, "meta": out_meta}


def _config_kwargs(cfg) -> dict:
    kw = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    kw["progress"] = False
    return kw


def profile_with_ray(args, corpus, cfg, writer, total: int, address: str | None = None) -> int:
    """Profile ``corpus`` on a Ray cluster into ``writer``'s run directory; returns the prompts profiled.

    ``address``: a cluster to join (``ray://host:10001`` or ``host:6379``), or None for a local one (``ray.init()``
    with this machine's CPUs and GPUs, or the cluster ``RAY_ADDRESS`` names).
    """
    try:
        import ray
    except ImportError:
        from attnscope.cli._common import CLIError

        raise CLIError("--ray needs Ray Data: pip install 'attnscope[distributed]'") from None
    from tqdm.auto import tqdm

    from .run import shard_windows
    from .store import committed_ids, is_run

    address = address if address is not None else (args.ray or None)
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    skip = committed_ids(writer.path) if writer.mode == "resume" and is_run(writer.path) else set()
    rows = []
    for first, window in shard_windows(iter(corpus), cfg):
        todo = [it for it in window if it.id not in skip]
        if todo:
            rows.append({"first": first, "ids": [it.id for it in todo], "texts": [it.text for it in todo]})
    if not rows:
        writer.precheck()
        return 0
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
        },
        batch_size=1,
        concurrency=n_actors,
        batch_format="default",
    )
    kw["num_gpus" if gpus else "num_cpus"] = 1 if gpus else max(1, cpus // n_actors)
    results = ds.map_batches(ShardActor, **kw)
    done = 0
    bar = tqdm(total=total, desc="profile", unit="prompt", disable=args.no_progress, dynamic_ncols=True)
    bar.update(total - sum(len(r["ids"]) for r in rows))
    opened = False
    try:
        for row in results.iter_rows():
            shard = pickle.loads(row["shard"])
            if not opened:
                writer.meta = pickle.loads(row["meta"])
                writer.open()
                opened = True
            writer.commit(shard)
            done += shard.n_prompts
            bar.update(shard.n_prompts)
    except BaseException:
        if opened:
            writer.close(complete=False)
        else:
            writer.discard()
        raise
    finally:
        bar.close()
    writer.close(complete=True)
    return done
