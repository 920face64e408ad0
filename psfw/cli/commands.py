"""What each ``psfw`` command does, once its flags are parsed (``psfw.cli.main``)."""

from __future__ import annotations

import argparse
import asyncio

from psfw.base.console import say
from psfw.base.errors import UsageError
from psfw.cli.arguments import listen_address, shard_addresses


def run_train(args: argparse.Namespace) -> int:
    import shlex
    from pathlib import Path

    from psfw.jobs.config import load_config
    from psfw.jobs.embedded import train
    from psfw.jobs.outputs import CHECKPOINTS, new_run_dir
    from psfw.jobs.run_dir import resume_hint

    config = load_config(args.config, args.set)
    _run_dir_flags(args)
    claimed = None if args.run_dir else new_run_dir()  # made at once: two runs never take the same
    run_dir = Path(args.run_dir) if args.run_dir else claimed
    command = shlex.join(["psfw", "train", args.config, *config.set_flags(), "--run-dir", str(run_dir), "--resume"])
    done: dict[int, int] = {}  # each group's completed steps, for the interrupt's line
    args.on_interrupt = lambda: resume_hint(
        command, run_dir / CHECKPOINTS, config.cluster.servers, config.train.checkpoint_every, _stopped_at(done)
    )
    try:
        result = train(
            config,
            run_dir,
            progress=not args.no_progress,
            resume=args.resume,
            overwrite=args.overwrite,
            change_optimizer=args.change_optimizer,
            done=done,
        )
    except BaseException:
        if claimed is not None and not any(claimed.iterdir()):
            claimed.rmdir()  # refused before anything was written: leave nothing behind
        raise
    print(f"{result.summary()}; {result.steps} steps; outputs in {result.run_dir}")
    return 0


def _run_dir_flags(args: argparse.Namespace) -> None:
    """--resume and --overwrite: each needs a --run-dir, and they exclude each other."""
    if args.resume and args.overwrite:
        raise UsageError("--overwrite starts the run in --run-dir again and --resume continues it: give one of them")
    for flag in ("resume", "overwrite"):
        if getattr(args, flag) and not args.run_dir:
            raise UsageError(
                f"--{flag} needs the --run-dir of the run to {'continue' if flag == 'resume' else 'start again'}"
            )


def _stopped_at(done: dict[int, int]) -> str:
    """``step 20``, ``steps 18 to 23`` (groups): where an interrupted run stopped."""
    if not done:
        return ""
    low, high = min(done.values()), max(done.values())
    return f"step {low}" if low == high else f"steps {low} to {high}"


def run_server(args: argparse.Namespace) -> int:
    from psfw.base.security import Security
    from psfw.services.server import serve

    try:
        listen_address(args.listen)
        asyncio.run(
            serve(
                args.shard,
                args.of,
                args.listen,
                grace=args.grace,
                drain=args.drain,
                metrics_port=args.metrics_port,
                link_port=args.link_port,
                nonfinite=args.nonfinite,
                insecure=args.insecure,
                checkpoint_dir=args.checkpoint_dir,
                ready_file=args.ready_file,
                security=Security.from_files(args.tls_cert, args.tls_key, args.tls_client_ca, args.token_file),
            )
        )
    except (PermissionError, OSError, ValueError) as err:
        say(f"psfw server: {err}")
        return 2
    return 0


def _client_security(args: argparse.Namespace):
    from psfw.base.security import Security

    return Security.from_files(args.tls_cert, args.tls_key, args.tls_ca, args.token_file)


def run_worker(args: argparse.Namespace) -> int:
    from psfw.jobs.config import load_config
    from psfw.jobs.embedded import train

    servers = shard_addresses(args.servers)
    if not servers:
        raise UsageError("give the running shards' addresses with --servers (or PSFW_SERVERS): host:port, ...")
    config = load_config(args.config, args.set)
    if args.resume and args.overwrite:
        raise UsageError("--overwrite starts the run in --run-dir again and --resume continues it: give one of them")
    if args.group is not None and args.process is not None:
        raise UsageError("--group runs every worker process of a group, --process one: give one of them")
    if args.group is not None:
        per_group = config.cluster.processes_per_group
        processes = list(range(args.group * per_group, (args.group + 1) * per_group))
    else:
        processes = [args.process or 0]
    if not args.launched:  # under psfw launch, launch says how to continue
        args.on_interrupt = lambda: "to continue, run the same command with --resume"
    result = train(
        config,
        args.run_dir,
        progress=False,
        servers=servers,
        processes=processes,
        resume=args.resume,
        overwrite=args.overwrite,
        security=_client_security(args),
    )
    if result.run_dir is not None:
        print(result.summary())
        print(f"outputs in {result.run_dir}")
    return 0


def run_launch(args: argparse.Namespace) -> int:
    from pathlib import Path

    from psfw.jobs.config import load_config
    from psfw.jobs.outputs import new_run_dir
    from psfw.jobs.supervisor import launch

    config = load_config(args.config, args.set)
    _run_dir_flags(args)
    run_dir = Path(args.run_dir) if args.run_dir else new_run_dir()
    return asyncio.run(launch(Path(args.config), config, run_dir, resume=args.resume, overwrite=args.overwrite))


def run_status(args: argparse.Namespace) -> int:
    from psfw.tools.cluster import Cluster, format_status

    async def show(addresses: list[str]) -> list[str]:
        async with Cluster(addresses, security=_client_security(args)) as cluster:
            rows = await cluster.status(args.interval)
        print(format_status(rows))
        return [r["problem"] for r in rows if r["problem"]]

    if args.servers and args.ray:
        raise UsageError("give the shards' addresses or --ray, not both")
    if args.ray:
        from psfw.jobs.ray_cluster import ray_jobs

        jobs = ray_jobs(args.ray)
        if not jobs:
            say(f"psfw status: no psfw job runs on the Ray cluster at {args.ray}")
            return 1
        problems = []
        for name, addresses in jobs.items():
            print(f"job {name} (Ray): {len(addresses)} shards", flush=True)
            missing = [i for i, a in enumerate(addresses) if a is None]
            if missing:
                problems.append(f"job {name}: shard {missing[0]} does not answer now (restarting?): try again")
                continue
            problems += asyncio.run(show(addresses))
    else:
        if not args.servers:
            raise UsageError("give the shards' addresses (host:port,...) or --ray ADDRESS")
        problems = asyncio.run(show(shard_addresses(args.servers, "the address list has")))
    for problem in problems:  # the table shows each shard's own index; this says what to fix
        say(f"psfw status: {problem}")
    return 1 if problems else 0


def run_ray(args: argparse.Namespace) -> int:
    from psfw.jobs.config import load_config
    from psfw.jobs.ray_cluster import ray_module
    from psfw.jobs.ray_run import train_on_ray

    ray_module()  # before the config is read: one line naming the extra
    config = load_config(args.config, args.set)
    _run_dir_flags(args)
    outcome = train_on_ray(
        config,
        args.run_dir,
        address=args.address,
        resume=args.resume,
        overwrite=args.overwrite,
        config_path=args.config,
    )
    if outcome.summary:
        print(outcome.summary)
    print(f"outputs in {outcome.run_dir}")
    return 0


def run_health(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from psfw.base.security import connection_problem

    shard_addresses(args.address)  # one host:port
    security = _client_security(args)
    if args.local:
        credentials, options = security.probe_credentials()
    else:
        credentials, options = security.channel_credentials(), []
    if credentials is None:
        channel = grpc.insecure_channel(args.address, options)
    else:
        channel = grpc.secure_channel(args.address, credentials, options)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as err:
            link = (
                connection_problem(err.details() or "", security) if err.code() == grpc.StatusCode.UNAVAILABLE else None
            )
            said = f"cannot connect: {link.cause}" if link and link.kind else err.details()
            print(f"{args.address}: {err.code().name}: {said}")
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.address}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def run_loadtest(args: argparse.Namespace) -> int:
    import json

    from psfw.tools.loadtest import load_test

    figures = load_test(args.groups, args.seconds, args.mb)
    print(json.dumps(figures, indent=None if args.json else 1))
    ok = not figures["errors"] and not figures["lost"] and not figures["doubled"] and figures["values_consistent"]
    return 0 if ok else 1


def run_bench(args: argparse.Namespace) -> int:
    from psfw.tools.bench_command import main as bench_main

    try:
        return bench_main(args)
    except ValueError as err:  # a flag it cannot use (a size, a count): say which
        say(f"psfw bench: {err}")
        return 2


def run_plan(args: argparse.Namespace) -> int:
    from psfw.tools.plan_command import main as plan_main

    try:
        return plan_main(args)
    except ValueError as err:  # a flag it cannot use (a count, a rate, a file): say which
        say(f"psfw plan: {err}")
        return 2


def run_eval(args: argparse.Namespace) -> int:
    import json

    from psfw.jobs.config import load_config
    from psfw.jobs.trained import evaluate_run

    config = load_config(args.config, args.set)
    record = evaluate_run(args.run_dir, config, args.step, args.checkpoint_dir, args.input)
    if args.json:
        print(json.dumps(record))
        return 0
    shown = ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in record.items() if k.startswith("test_"))
    print(f"step {record['step']}: {shown}")
    return 0


def run_predict(args: argparse.Namespace) -> int:
    from pathlib import Path

    from psfw.jobs.config import load_config
    from psfw.jobs.predictions import load_model, write_predictions
    from psfw.jobs.user_rows import read_rows

    config = load_config(args.config, args.set)
    rows = read_rows(args.input) if args.input else None  # a wrong file is refused before the model is built
    model = load_model(args.run_dir, args.step, config, args.checkpoint_dir)
    x = model.job.data.x_test if rows is None else rows
    predictions = model.predict(x)
    output = Path(args.output) if args.output else Path(args.run_dir) / "predictions.npy"
    written = write_predictions(output, predictions, model.predicted_class(predictions))
    source = args.input or "the test split"
    print(f"step {model.step}: {len(predictions)} rows of {source} -> {', '.join(map(str, written))}")
    return 0


def run_generate(args: argparse.Namespace) -> int:
    import sys

    from psfw.jobs.config import load_config
    from psfw.jobs.predictions import generate, load_model

    config = load_config(args.config, args.set)
    model = load_model(args.run_dir, args.step, config, args.checkpoint_dir)
    prompt = args.prompt.encode()
    text = generate(model, prompt, args.bytes, args.temperature, args.seed)
    sys.stdout.write((prompt + text).decode("utf-8", errors="replace") + "\n")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from psfw.jobs.export import export_table

    exported = export_table(args.run_dir, args.table, args.to, args.step, args.checkpoint_dir)
    print(f"psfw export: {exported.summary()}")
    return 0


def run_reshard(args: argparse.Namespace) -> int:
    from pathlib import Path

    from psfw.jobs.config import load_config
    from psfw.jobs.outputs import CHECKPOINTS
    from psfw.jobs.reshard import reshard_for_config
    from psfw.services.checkpoint import complete_counts, complete_steps

    if bool(args.run_dir) == bool(args.checkpoint_dir):
        raise UsageError("give the run's --run-dir or the shards' --checkpoint-dir, one of them")
    config = load_config(args.config, args.set)
    root = Path(args.checkpoint_dir) if args.checkpoint_dir else Path(args.run_dir) / CHECKPOINTS
    shards = args.shards or config.cluster.servers
    steps = complete_steps(root)
    if not steps:
        raise UsageError(f"{root} holds no complete checkpoint to re-cut")
    done = reshard_for_config(root, config, shards)
    if done is None:
        made_on = " and ".join(map(str, complete_counts(root, steps[-1])))
        print(
            f"psfw reshard: the newest checkpoint in {root} (step {steps[-1]}) is of {made_on} shards: nothing to re-cut"
        )
        return 0
    print(
        f"psfw reshard: the checkpoint of step {done.step} made on {done.made_on} shards in {root} is re-cut for "
        f"{shards}; {shards} shards with --checkpoint-dir {root} load it"
    )
    return 0
