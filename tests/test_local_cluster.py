"""A real two-node cluster made with `ray start` (glmc_ray.distributed.local_cluster): a `--nodes 2` run and a 2-trial
search through Ray's CLI path, and the loss of the second node in the middle of a run."""
import csv
import shlex
import subprocess
import sys
import time

from glmc_ray.distributed.local_cluster import LocalCluster, free_ports, processes_under
from glmc_ray.runs import rundir
from tests.conftest import REPO

SMOKE = str(REPO / "configs/smoke.yaml")


def _train(output, storage, epochs):
    return [sys.executable, "-m", "glmc_ray.train", "--config", SMOKE, "--nodes", "2", "--output", str(output),
            "--storage", str(storage), "--set", f"train.epochs={epochs}"]


def test_the_documented_command_trains_and_searches_on_two_nodes_and_stops_only_its_processes(tmp_path):
    before = subprocess.run(["pgrep", "-f", "glmc-cluster-"], capture_output=True, text=True).stdout.split()
    search = [sys.executable, "tuning/search.py", "--config", SMOKE, "--set", "data.synthetic_max_count=64",
              "--space", "configs/search/glmc.yaml", "--trials", "2", "--concurrent", "2", "--trial-epochs", "1",
              "--output", str(tmp_path / "shared" / "search")]  # one CPU trial on each node
    both = " && ".join(shlex.join(command) for command in (_train(tmp_path / "runs", tmp_path / "shared", 2), search))
    done = subprocess.run([sys.executable, "-m", "glmc_ray.distributed.local_cluster", "--", "bash", "-c", both],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "local cluster at 127.0.0.1:" in done.stdout and "2 CPU workers on 2 node(s)" in done.stdout
    run = next((tmp_path / "runs").iterdir())
    assert [r["epoch"] for r in rundir.read_metrics(run)] == [0, 1]
    assert (tmp_path / "shared" / run.name / "checkpoint_epoch0001").is_dir()  # checkpoints on the shared path
    experiment = next((tmp_path / "shared" / "search").iterdir())
    with open(experiment / "trials.csv") as f:
        assert [row["status"] for row in csv.DictReader(f)] == ["complete", "complete"]
    after = subprocess.run(["pgrep", "-f", "glmc-cluster-"], capture_output=True, text=True).stdout.split()
    assert set(after) <= set(before)  # every process it started is gone


def test_a_lost_node_that_comes_back_ends_in_a_complete_run_with_each_epoch_once(tmp_path):
    """Before it, on the same cluster (2 CPUs, no autoscaler): 3 workers can never fit, and are refused at once."""
    with LocalCluster(head_cpus=1, worker_cpus=1) as cluster:
        refused = subprocess.run([sys.executable, "-m", "glmc_ray.train", "--config", SMOKE, "--workers", "3",
                                  "--output", str(tmp_path / "refused")], cwd=REPO, env=cluster.env,
                                 capture_output=True, text=True, timeout=120)
        errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
        assert refused.returncode == 2 and errors == [
            "error: 3 workers need 3 CPUs (with the data streams), but this Ray cluster has 2 CPUs and no autoscaler "
            "to add nodes: use fewer workers, or a cluster that has them"], refused.stdout + refused.stderr
        assert not (tmp_path / "refused").exists()
        training = subprocess.Popen(_train(tmp_path / "runs", tmp_path / "shared", 4), cwd=REPO, env=cluster.env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 300
        while time.time() < deadline and training.poll() is None:
            runs = list((tmp_path / "runs").glob("*"))
            if runs and rundir.read_metrics(runs[0]):
                break
            time.sleep(0.5)
        assert training.poll() is None, "the run ended before a node could be lost"
        cluster.stop_node(cluster.worker)  # the machine vanishes: raylet, agents and the Train worker on it
        assert not processes_under(cluster.worker.temp_dir)
        time.sleep(5)
        cluster.start_node(cluster.worker)  # the autoscaler's replacement node joins
        output, _ = training.communicate(timeout=500)
    assert training.returncode == 0, output[-4000:]
    run = next((tmp_path / "runs").iterdir())
    assert [r["epoch"] for r in rundir.read_metrics(run)] == [0, 1, 2, 3]
    assert "restored checkpoint" in output  # the worker group restarted from the latest checkpoint


def test_ports_chosen_together_are_distinct():
    # one port at a time, the kernel can hand the same one out twice (CI once gave the head's GCS and client
    # server the same port, and `ray start` failed)
    ports = free_ports(200)
    assert len(set(ports)) == 200
