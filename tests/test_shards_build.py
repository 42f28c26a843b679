"""`python -m glmc_ray.shards build`: a split's image tree as Parquet shards and a manifest (real files, no Ray)."""
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from glmc_ray import shards
from glmc_ray.data import shard_format
from glmc_ray.data.cifar import long_tailed_counts
from glmc_ray.data.files import parse_split_lines
from glmc_ray.data.synthetic import write_image_tree
from tests.conftest import REPO, SHARED

COUNTS = long_tailed_counts(60, 20, 30)  # 60 down to 2 images
ROWS = 64


def build_args(split: Path, out: Path, *extra: str) -> list[str]:
    return ["build", "--split", str(split), "--image-root", str(split.parent), "--out", str(out), "--workers", "2",
            "--rows-per-shard", str(ROWS), "--row-group-size", "16", *extra]


def unreadable_lines(split: Path) -> list[int]:
    """Line numbers of the split whose image PIL cannot decode fully (found here independently of the builder)."""
    bad = []
    for sample in parse_split_lines(split):
        try:
            with Image.open(split.parent / sample.path) as image:
                image.load()
        except OSError:
            bad.append(sample.line)
    return bad


def rows(out: Path) -> list[dict]:
    return [row for part in sorted(out.glob("part-*.parquet")) for row in pq.read_table(part).to_pylist()]


def corrupt_a_page(shard: Path, row_group: int) -> None:
    """Storage corruption after the build: 200 bytes inverted in the middle of the image column chunk of
    `row_group` (inside one of its pages, among encoded JPEG bytes); the file keeps its size and footer."""
    column = pq.ParquetFile(shard).metadata.row_group(row_group).column(0)
    assert column.path_in_schema == "image"
    start = column.dictionary_page_offset if column.has_dictionary_page else column.data_page_offset
    offset = start + column.total_compressed_size // 2
    with open(shard, "r+b") as f:
        f.seek(offset)
        inverted = bytes(b ^ 0xFF for b in f.read(200))
        f.seek(offset)
        f.write(inverted)


def without_created(manifest: dict) -> dict:
    return {key: value for key, value in manifest.items() if key != "created"}


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return write_image_tree(tmp_path_factory.mktemp("imagenet"), COUNTS, seed=0, corrupt=1, test_per_class=2)


@pytest.fixture(scope="module")
def built(tree, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "train"
    assert shards.main(build_args(tree, out)) == 0
    return out


def test_image_tree_is_imagenet_shaped_and_varied(tree):
    samples = parse_split_lines(tree)
    assert Counter(s.label for s in samples) == dict(enumerate(COUNTS))
    assert all(s.path.startswith("train/n") and s.path.endswith(".JPEG") for s in samples)
    kinds, sizes = Counter(), []
    for sample in samples:
        with Image.open(tree.parent / sample.path) as image:
            kinds[image.format, image.mode] += 1
            sizes.append(image.size)
    assert {("JPEG", "RGB"), ("JPEG", "L"), ("JPEG", "CMYK"), ("PNG", "RGB")} <= set(kinds)
    assert 64 <= min(map(min, sizes)) and max(map(max, sizes)) <= 500 and all(w != h for w, h in sizes)
    assert len(unreadable_lines(tree)) == 1
    test = parse_split_lines(tree.parent / "ImageNet_LT_test.txt")
    assert len(test) == 2 * len(COUNTS) and test[0].path.startswith("val/n")
    assert unreadable_lines(tree.parent / "ImageNet_LT_test.txt") == []


def test_build_keeps_each_readable_image_once_in_interleaved_shards(tree, built):
    manifest = shard_format.read_manifest(built)
    samples = parse_split_lines(tree)
    [bad_line] = unreadable_lines(tree)
    bad = samples[bad_line - 1]  # the tree's split file has no blank line
    expected_counts = list(COUNTS)
    expected_counts[bad.label] -= 1
    assert manifest["num_rows"] == sum(COUNTS) - 1 and manifest["class_counts"] == expected_counts
    assert manifest["num_classes"] == len(COUNTS) and manifest["split_file"] == "ImageNet_LT_train.txt"
    assert [(s["line"], s["path"]) for s in manifest["skipped"]] == [(bad_line, bad.path)]
    assert "truncated" in manifest["skipped"][0]["reason"]
    assert len(manifest["shards"]) == -(-len(samples) // ROWS)
    for shard in manifest["shards"]:
        footer = pq.read_metadata(built / shard["file"])
        assert footer.metadata[shard_format.FORMAT_KEY] == b"1" and footer.num_rows == shard["rows"]
        assert footer.num_row_groups == -(-shard["rows"] // 16)
        assert len(set(pq.read_table(built / shard["file"], columns=["label"])["label"].to_pylist())) > 1
        assert shard["sha256"] == hashlib.sha256((built / shard["file"]).read_bytes()).hexdigest()
    found = rows(built)
    assert sorted(row["index"] for row in found) == [i for i in range(len(samples)) if i != bad_line - 1]
    kinds = Counter()
    for row in found:
        sample = samples[row["index"]]
        assert (row["path"], row["label"]) == (sample.path, sample.label)
        assert row["image"] == (tree.parent / sample.path).read_bytes()
        with Image.open(io.BytesIO(row["image"])) as image:
            image.load()
            kinds[image.format, image.mode] += 1
    assert {("JPEG", "L"), ("JPEG", "CMYK"), ("PNG", "RGB")} <= set(kinds)
    shard_format.check_shards(built, manifest)
    assert shard_format.shard_paths(built, manifest)[0] == str(built.resolve() / "part-00000.parquet")


def test_on_error_fail_names_file_and_line_and_writes_no_manifest(tree, tmp_path, capsys):
    [bad_line] = unreadable_lines(tree)
    assert shards.main(build_args(tree, tmp_path / "out", "--on-error", "fail")) == 2
    bad = parse_split_lines(tree)[bad_line - 1]
    assert f"error: ImageNet_LT_train.txt:{bad_line}: {bad.path}: " in capsys.readouterr().err
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_missing_and_empty_images_are_skipped_and_a_bad_line_is_an_error(tree, tmp_path, capsys):
    (tmp_path / "train").mkdir()
    shutil.copyfile(tree.parent / parse_split_lines(tree)[0].path, tmp_path / "train" / "a.JPEG")
    (tmp_path / "train" / "empty.JPEG").write_bytes(b"")
    split = tmp_path / "small.txt"
    split.write_text("train/a.JPEG 0\ntrain/none.JPEG 1\n\ntrain/empty.JPEG 2\n")
    assert shards.main(build_args(split, tmp_path / "out")) == 0
    manifest = shard_format.read_manifest(tmp_path / "out")
    assert manifest["num_rows"] == 1 and manifest["class_counts"] == [1, 0, 0]
    assert [(s["line"], s["reason"]) for s in manifest["skipped"]] == [
        (2, "file does not exist"), (4, "OSError: empty file (0 bytes)")]
    assert "warning: skipped small.txt:2: train/none.JPEG: file does not exist" in capsys.readouterr().err
    split.write_text("train/a.JPEG 0\ntrain/x.JPEG\n")
    assert shards.main(build_args(split, tmp_path / "other")) == 2
    assert "small.txt:2: expected 'relative/path label'" in capsys.readouterr().err


def test_killed_build_resumes_with_only_the_missing_shards(tree, tmp_path, capsys):
    out, command = tmp_path / "killed", build_args(tree, tmp_path / "killed")
    command[command.index("--rows-per-shard") + 1] = "8"  # 44 shards: the kill lands mid-build
    command[command.index("--workers") + 1] = "1"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    build = subprocess.Popen([sys.executable, "-m", "glmc_ray.shards", *command], env=env, cwd=REPO,
                             start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not list((out / "_progress").glob("part-*.json")) and build.poll() is None:
            time.sleep(0.01)
    finally:
        os.killpg(build.pid, signal.SIGKILL)  # the command, its forkserver and its pool worker
        build.wait()
    assert not (out / "manifest.json").exists(), "the build finished before it could be killed"
    finished = {p.stem: (out / f"{p.stem}.parquet").stat().st_mtime_ns for p in (out / "_progress").glob("part-*")}
    assert finished, "the build died before its first shard"
    assert shards.main(command) == 0
    total = len(list(out.glob("part-*.parquet")))
    assert f"in {total} shards ({total - len(finished)} written now)" in capsys.readouterr().out
    assert {name: (out / f"{name}.parquet").stat().st_mtime_ns for name in finished} == finished
    uninterrupted = tmp_path / "uninterrupted"
    assert shards.main([str(uninterrupted) if arg == str(out) else arg for arg in command]) == 0
    assert without_created(shard_format.read_manifest(out)) == \
        without_created(shard_format.read_manifest(uninterrupted))
    assert shards.main(command) == 0 and "is complete" in capsys.readouterr().out
    command[command.index("--rows-per-shard") + 1] = "9"
    assert shards.main(command) == 2
    assert "planned with rows_per_shard=8, this build has rows_per_shard=9; use another" in capsys.readouterr().err


def test_max_side_shrinks_large_images_and_keeps_small_ones(tree, tmp_path):
    out = tmp_path / "small"
    assert shards.main(build_args(tree, out, "--max-side", "96")) == 0
    samples, kept = parse_split_lines(tree), 0
    for row in rows(out):
        original = (tree.parent / samples[row["index"]].path).read_bytes()
        with Image.open(io.BytesIO(row["image"])) as image, Image.open(io.BytesIO(original)) as source:
            assert max(image.size) == min(96, max(source.size))
            if max(source.size) <= 96:
                kept += 1
                assert row["image"] == original
            else:
                assert image.format == "JPEG" and image.mode == ("L" if source.mode == "L" else "RGB")
    assert kept >= 1
    assert shard_format.read_manifest(out)["max_side"] == 96


def test_readers_name_what_is_wrong(built, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"shard set .*nowhere does not exist"):
        shard_format.read_manifest(tmp_path / "nowhere")
    (tmp_path / "unfinished").mkdir()
    with pytest.raises(FileNotFoundError, match=r"unfinished has no manifest.json: it is not a finished shard set"):
        shard_format.read_manifest(tmp_path / "unfinished")
    copy = tmp_path / "copy"
    shutil.copytree(built, copy)
    manifest = shard_format.read_manifest(copy)
    table = pq.read_table(copy / "part-00001.parquet")
    pq.write_table(table.slice(1), copy / "part-00001.parquet", row_group_size=16)  # keeps the schema metadata
    with pytest.raises(ValueError, match=r"part-00001.parquet: the manifest expects \d+ bytes, the shard has \d+; the"):
        shard_format.check_shards(copy, manifest)
    manifest["shards"][1]["bytes"] = (copy / "part-00001.parquet").stat().st_size
    listed = manifest["shards"][1]["rows"]
    with pytest.raises(ValueError, match=rf"part-00001.parquet: the manifest expects {listed} rows, the shard has "
                                         rf"{listed - 1}; the manifest does not match its shards"):
        shard_format.check_shards(copy, manifest)
    manifest["shards"][1]["rows"] = listed - 1  # the shards now agree with the manifest, its total does not
    with pytest.raises(ValueError, match=rf"manifest.json: the manifest says num_rows={manifest['num_rows']}, its "
                                         rf"shards hold {manifest['num_rows'] - 1} rows \(their Parquet footers"):
        shard_format.check_shards(copy, manifest)
    (copy / "manifest.json").write_text(json.dumps({**manifest, "format": 0}))
    with pytest.raises(ValueError, match=r"manifest.json: written by format 0, this version reads 1; rebuild with"):
        shard_format.read_manifest(copy)


def test_check_command_on_a_built_set(built, capsys):
    done = subprocess.run([sys.executable, "-m", "glmc_ray.shards", "check", str(built)], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert f"{sum(COUNTS) - 1} rows, {len(COUNTS)} classes" in done.stdout
    assert shards.main(["check", str(built), "--deep"]) == 0
    assert "every row group decodes, every sha256 matches the manifest's" in capsys.readouterr().out


def test_check_deep_names_a_shard_corrupted_inside_a_page_and_a_rebuild_repairs_it(tree, built, tmp_path, capsys):
    """Bytes changed in the middle of a shard (same size, footer intact): the plain check cannot see it,
    `--deep` names the shard and its rows, exit 2; deleting it and the manifest and building again repairs it."""
    copy = tmp_path / "copy"
    shutil.copytree(built, copy)
    damaged = copy / "part-00001.parquet"
    corrupt_a_page(damaged, row_group=1)
    assert shards.main(["check", str(copy)]) == 0
    capsys.readouterr()
    assert shards.main(["check", str(copy), "--deep"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"damaged shard {damaged}: rows 16-31 (row group 1) do not decode (OSError: ")
    assert "CRC checksum verification failed" in lines[0] and "its sha256 is" in lines[0]
    assert lines[1].startswith(f"error: {copy}: 1 of {len(list(copy.glob('*.parquet')))} shards are damaged")
    # a manifest of a build that recorded no checksums: the decode still finds it, and says what it did not do
    manifest = json.loads((copy / "manifest.json").read_text())
    for shard in manifest["shards"]:
        del shard["sha256"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert shards.main(["check", str(copy), "--deep"]) == 2
    out, err = capsys.readouterr()
    assert err.startswith(f"damaged shard {damaged}: rows 16-31 (row group 1) do not decode") and "sha256" not in err
    assert "note: the manifest records no sha256 for" in out
    # the repair the error suggests
    damaged.unlink()
    (copy / "manifest.json").unlink()
    assert shards.main(build_args(tree, copy)) == 0
    assert shards.main(["check", str(copy), "--deep"]) == 0
    assert without_created(shard_format.read_manifest(copy)) == without_created(shard_format.read_manifest(built))


@pytest.mark.parametrize("name,samples,classes", [("ImageNet_LT_test.txt", 50000, 1000),
                                                  ("iNaturalist18_val.txt", 24426, 8142)])
def test_real_split_files_parse_with_the_builders_parser(name, samples, classes):
    labels = Counter(sample.label for sample in parse_split_lines(SHARED / "data" / "splits" / name))
    assert sum(labels.values()) == samples and len(labels) == classes and max(labels) + 1 == classes
    if name.startswith("ImageNet"):
        assert set(labels.values()) == {50}
