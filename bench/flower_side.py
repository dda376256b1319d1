"""The Flower side of bench/flower.py: hierfed's flat FedAvg job, run by Flower's simulation or deployment engine.

    .venv-flower/bin/python bench/flower_side.py --engine simulation|deployment --json OUT.json [--set KEY=VALUE ...]

Runs in its own venv (.venv-flower: flwr[simulation] with Ray, and hierfed installed with
--no-deps); bench/flower.py starts it, with the same --set overrides it gives `hierfed run`.

The work is hierfed's, call for call, so that only the framework differs:
  - each client c (Flower's partition-id) trains hierfed's shard c of the task with
    `LocalTrainer.train(data, tau1, derive_seed(seed, round, 1, c))` from the global adapter, as a
    device rank of a flat hierfed topology does, and returns the adapter and its shard size;
  - the server aggregates with Flower's FedAvg (message API, `flwr.serverapp.strategy.FedAvg`)
    and evaluates the global model on hierfed's eval set before round 1 and after every round
    (`evaluate_fn`), as hierfed's cloud does;
  - one torch thread per client (and on the server).
  - simulation: the Ray pool gets num_cpus = cores / clients per client, so all clients train at
    once, as hierfed's device ranks do. (Flower's default of 2 CPUs per client would run one
    client at a time on this 2-core machine.) Ray's actors run at the same priority as every
    other process (RAY_worker_niceness=0). Ray starts them at nice 15 by default: on a machine
    shared with other jobs, as this one is, the clients would then wait for those jobs and Flower
    would be measured against them, not against hierfed (a first run here spent 160 s of round 1
    starting niced actors at load 20).
  - deployment: a SuperLink and one SuperNode per client on this machine, the app submitted with
    `flwr run` (see deploy()). Flower's default isolation starts a fresh `flwr-clientapp` process
    for every message, so each client imports torch and builds its model again every round.

Only the trainable parameters travel (the LoRA adapter and the classifier head), as named arrays
in an ArrayRecord. A process builds the model and tokenises its shards once and keeps them while
it lives (a module-level cache): a Ray actor for the whole run, a deployed ClientApp for one message.
(Flower's quickstarts rebuild the model on every call.)

Timestamps (time.time(), absolute) go to --json: process start, imports done, and for each round
the start of configure_train, the end of aggregate_train, the slowest client's local-training
compute (`compute-s`, timed in the client around set/train/get, as hierfed's device times
`compute_s`) and the server evaluation that follows.
"""

from __future__ import annotations

import time

PROCESS_START = time.time()  # before the heavy imports: they are part of start-up

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import tomli_w  # noqa: E402  (comes with flwr)
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402

from hierfed.config import RunConfig, load_config  # noqa: E402
from hierfed.data import load_data, partition  # noqa: E402
from hierfed.model import FlatView, build_model  # noqa: E402
from hierfed.seeding import derive_seed  # noqa: E402
from hierfed.training import LocalTrainer, configure_threads, tokenize  # noqa: E402

IMPORTS_DONE = time.time()


class Job:
    """What one process (an actor or the server) builds once: the model, its flat view, the data."""

    def __init__(self, cfg: RunConfig, num_clients: int) -> None:
        configure_threads(cfg.runtime.threads)
        self.cfg = cfg
        self.task = load_data(cfg.data)
        self.shards = partition(self.task.train, num_clients, cfg.data.partition, alpha=cfg.data.alpha, seed=cfg.data.seed)
        self.built = build_model(cfg.model, cfg.peft, self.task.kind, self.task.num_labels, cfg.seed)
        self.flat = FlatView(self.built.model)
        self.trainer = LocalTrainer(self.built.model, cfg.train)
        self.data: dict[int, object] = {}

    def client_data(self, c: int):
        if c not in self.data:
            examples = [self.task.train[i] for i in self.shards[c]]
            self.data[c] = tokenize(self.built.tokenizer, examples, self.task.kind, self.cfg.model.max_length)
        return self.data[c]

    def to_record(self, vec: np.ndarray) -> ArrayRecord:
        return ArrayRecord(self.flat.state_dict(vec))

    def from_record(self, record: ArrayRecord) -> np.ndarray:
        return np.concatenate([a.reshape(-1) for a in record.to_numpy_ndarrays()]).astype(np.float32, copy=False)


_JOBS: dict[str, Job] = {}  # per process (Ray actor): built on the first message, kept across rounds


def job_for(overrides: str, num_clients: int) -> Job:
    if overrides not in _JOBS:
        _JOBS[overrides] = Job(load_config(None, json.loads(overrides)), num_clients)
    return _JOBS[overrides]


# ---------------------------------------------------------------- client ---
client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    c, n = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    job = job_for(str(config["overrides"]), n)
    data = job.client_data(c)
    params = job.from_record(msg.content["arrays"])
    started = time.perf_counter()  # as hierfed's device: set, tau1 steps, get
    job.flat.set(params)
    loss, _ = job.trainer.train(data, job.cfg.schedule.tau1, derive_seed(job.cfg.seed, int(config["server-round"]), 1, c))
    new = job.flat.get()
    compute_s = time.perf_counter() - started
    metrics = MetricRecord({"num-examples": len(data), "train-loss": loss, "compute-s": compute_s})
    return Message(RecordDict({"arrays": job.to_record(new), "metrics": metrics}), reply_to=msg)


# ---------------------------------------------------------------- server ---
class TimedFedAvg(FedAvg):
    """FedAvg that notes when each round starts and ends and its clients' compute seconds."""

    def __init__(self, rounds: dict[int, dict], **kwargs) -> None:
        super().__init__(**kwargs)
        self.rounds = rounds

    def configure_train(self, server_round, arrays, config, grid):
        self.rounds.setdefault(server_round, {})["start"] = time.time()
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        computes = [m.content["metrics"]["compute-s"] for m in replies if not m.has_error()]
        if len(computes) != len(replies):
            raise RuntimeError(f"round {server_round}: {len(replies) - len(computes)} client(s) failed: "
                               + "; ".join(m.error.reason for m in replies if m.has_error()))
        out = super().aggregate_train(server_round, replies)
        row = self.rounds[server_round]
        row.update(end=time.time(), compute_s=max(computes), client_compute_s=computes,
                   train_loss=float(out[1]["train-loss"]) if out[1] else None)
        return out


def serve(grid: Grid, overrides: list[str], num_clients: int, timeline: dict) -> None:
    """The server's side of the job: hierfed's model and eval set, Flower's FedAvg, R rounds."""
    job = job_for(json.dumps(overrides), num_clients)
    timeline["server_model_built"] = time.time()
    eval_data = tokenize(job.built.tokenizer, job.task.eval, job.task.kind, job.cfg.model.max_length)
    rounds: dict[int, dict] = timeline["rounds"]

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        t0 = time.time()
        job.flat.set(job.from_record(arrays))
        metrics = job.trainer.evaluate(eval_data, job.task.kind, job.cfg.schedule.eval_batch_size)
        rounds.setdefault(server_round, {}).update(eval_s=time.time() - t0, **metrics)
        return MetricRecord(metrics)

    strategy = TimedFedAvg(rounds, fraction_train=1.0, fraction_evaluate=0.0,  # no federated eval: hierfed has none
                           min_train_nodes=num_clients, min_available_nodes=num_clients)
    strategy.start(grid=grid, initial_arrays=job.to_record(job.flat.get()), num_rounds=job.cfg.schedule.rounds,
                   train_config=ConfigRecord({"overrides": json.dumps(overrides)}), evaluate_fn=evaluate)


def simulation_server_app(overrides: list[str], num_clients: int, timeline: dict) -> ServerApp:
    """For run_simulation, which runs the ServerApp in this process: the timeline is filled in place."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        serve(grid, overrides, num_clients, timeline)

    return app


# Deployment: `flwr run` makes the SuperLink start this ServerApp in a process of its own
# (flwr-serverapp); what to run and where to write the timeline come in the run config.
server_app = ServerApp()


@server_app.main()
def deployed_main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    configure_threads(1)
    timeline = {"serverapp_start": PROCESS_START, "imports_done": IMPORTS_DONE, "rounds": {}}
    serve(grid, json.loads(str(rc["overrides"])), int(rc["clients"]), timeline)
    Path(str(rc["timeline"])).write_text(json.dumps(timeline, indent=2) + "\n")


# ------------------------------------------------------------ the engines ---
def simulate(args: argparse.Namespace) -> dict:
    """Flower's simulation engine: run_simulation with the Ray backend, in this process."""
    from flwr.simulation import run_simulation  # here: a deployed ClientApp process need not import it

    timeline = {"process_start": PROCESS_START, "imports_done": IMPORTS_DONE, "rounds": {}}
    os.environ.setdefault("RAY_worker_niceness", "0")  # inherited by the raylet that starts the actors
    backend = {"client_resources": {"num_cpus": (os.cpu_count() or 1) / args.clients, "num_gpus": 0.0}}
    # The app objects must pickle by reference (module flower_side, on the actors' PYTHONPATH, which
    # Flower sets from this sys.path), so that each actor keeps its _JOBS cache between messages.
    import flower_side

    run_simulation(server_app=simulation_server_app(args.overrides, args.clients, timeline),
                   client_app=flower_side.client_app, num_supernodes=args.clients, backend_config=backend)
    import ray

    timeline.update(ray=ray.__version__, backend_config=backend, ray_worker_niceness=os.environ["RAY_worker_niceness"])
    return timeline


PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "hierfed-flower-bench"
version = "1.0.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "hierfed"

[tool.flwr.app.components]
serverapp = "flower_side:server_app"
clientapp = "flower_side:client_app"

[tool.flwr.app.config]
overrides = "[]"
clients = 4
timeline = ""
"""
SUPERLINK_PORT, SUPERNODE_PORTS = 19090, 19100  # the SuperLink's HTTP API (fleet, control); each SuperNode's own API


def wait_for_port(port: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.1)


def deploy(args: argparse.Namespace) -> dict:
    """Flower's deployment engine on this machine: a SuperLink, one SuperNode per client, `flwr run`.

    Everything runs from a scratch directory, removed afterwards unless the run fails: the Flower
    app (this file + a pyproject.toml), FLWR_HOME (a config.toml naming the SuperLink) and the
    logs. Plain HTTP on 127.0.0.1, ports 19xxx. Each process gets a process group of its own (not
    a session: a new session would also be a new scheduler autogroup, with a CPU share of its own).
    """
    bin_ = Path(sys.executable).parent
    work = Path(tempfile.mkdtemp(prefix="hierfed-flower-deploy-"))
    app, home = work / "app", work / "flwr-home"
    app.mkdir()
    home.mkdir()
    shutil.copy(__file__, app / "flower_side.py")
    (app / "pyproject.toml").write_text(PYPROJECT)
    (home / "config.toml").write_text(f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\n'
                                      f'address = "127.0.0.1:{SUPERLINK_PORT}"\ninsecure = true\n')
    # PATH: the SuperNodes start `flower-superexec` (and it the ClientApps) by name
    env = {**os.environ, "FLWR_HOME": str(home), "OMP_NUM_THREADS": "1", "PATH": f"{bin_}{os.pathsep}{os.environ['PATH']}"}
    timeline_path = work / "timeline.json"
    procs: list[subprocess.Popen] = []

    def start(name: str, cmd: list[str]) -> None:
        log = open(work / f"{name}.log", "w")
        procs.append(subprocess.Popen(cmd, env=env, cwd=work, stdout=log, stderr=subprocess.STDOUT, process_group=0))

    timeline: dict = {"process_start": PROCESS_START, "imports_done": IMPORTS_DONE}
    try:
        timeline["superlink_launch"] = time.time()
        start("superlink", [str(bin_ / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(SUPERLINK_PORT)])
        wait_for_port(SUPERLINK_PORT)
        for i in range(args.clients):
            start(f"supernode{i}", [str(bin_ / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{SUPERLINK_PORT}",
                                    "--port", str(SUPERNODE_PORTS + i),
                                    "--node-config", f"partition-id={i} num-partitions={args.clients}"])
        run_config = work / "run-config.toml"  # a file: the overrides hold '=' and quotes
        run_config.write_text(tomli_w.dumps({"overrides": json.dumps(args.overrides), "clients": args.clients, "timeline": str(timeline_path)}))
        timeline["flwr_run"] = time.time()
        subprocess.run([str(bin_ / "flwr"), "run", str(app), "bench", "--run-config", str(run_config)], env=env, cwd=work, check=True,
                       stdout=open(work / "flwr-run.log", "w"), stderr=subprocess.STDOUT)
        deadline = time.time() + args.deploy_timeout
        while not timeline_path.exists():
            if time.time() > deadline:
                raise SystemExit(f"deployment: no result after {args.deploy_timeout} s; logs in {work}")
            time.sleep(0.5)
        time.sleep(0.5)  # the file is written in one call; let it land
    finally:
        for p in reversed(procs):  # each one's process group holds what it spawned
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
    served = json.loads(timeline_path.read_text())
    shutil.rmtree(work)
    timeline.update(rounds=served["rounds"], serverapp_start=served["serverapp_start"],
                    serverapp_imports_done=served["imports_done"], server_model_built=served["server_model_built"])
    return timeline


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True, help="write the timeline here")
    ap.add_argument("--engine", choices=("simulation", "deployment"), default="simulation")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--deploy-timeout", type=float, default=1200, help="deployment: give up after this many seconds")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="hierfed run-config overrides, as given to `hierfed run`")
    args = ap.parse_args()
    configure_threads(load_config(None, args.overrides).runtime.threads)  # the server's evaluation, as hierfed's cloud
    timeline = simulate(args) if args.engine == "simulation" else deploy(args)
    timeline["engine_done"] = time.time()
    import flwr

    timeline.update(engine=args.engine, versions={"flwr": flwr.__version__, "python": sys.version.split()[0]})
    Path(args.json).write_text(json.dumps(timeline, indent=2) + "\n")


if __name__ == "__main__":
    main()
