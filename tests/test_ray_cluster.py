"""Multi-node on one machine: a 2-node Ray cluster, one training worker on each node."""
import json

import pytest
import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from glmc_ray.train import main
from tests.conftest import REPO, stop_ray


@pytest.fixture
def two_node_cluster():
    stop_ray()  # main() must find this cluster, not the suite's shared instance
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster  # not connected here: main() must find the running cluster itself, as on a `ray up` head node
    ray.shutdown()
    cluster.shutdown()


def test_workers_on_two_nodes_complete_a_run(two_node_cluster, tmp_path):
    assert main(["--config", str(REPO / "configs/smoke.yaml"), "--nodes", "2", "--output", str(tmp_path),
                 "--set", "train.epochs=2"]) == 0
    assert len(ray.nodes()) == 2  # main() joined the 2-node cluster instead of starting its own instance
    workers = list_actors(filters=[("class_name", "=", "RayTrainWorker")])
    assert len({w.node_id for w in workers}) == 2
    run = next(p for p in tmp_path.iterdir() if p.is_dir())
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [0, 1]
