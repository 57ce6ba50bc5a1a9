"""Your own images: --dataset unlabelled on a nested folder without classes, the listing rules
(images/folders.py) for it and for the labelled folders, the resume line, and the bad folders a
user brings, each one line with nothing written."""
import os
import pathlib

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from images.folders import ClassFolders, list_images
from runtime.checkpoint import read_log
from conftest import free_port, fails_in_process, jpeg_folder, run_cli, snapshot

TINY_RUN = ["--dataset", "unlabelled", "--arch", "resnet18", "--image-size", "16", "--batch-size", "4",
            "--queue-size", "8", "-K", "2", "--dim", "16", "--mlp-dim", "32", "--workers", "0", "--optimizer",
            "sgd", "--lr", "0.1", "--warmup-epochs", "0", "--device", "cpu"]


def photos(folder: pathlib.Path, names, seed: int = 0) -> None:
    """Random JPEG / PNG pictures at the given relative paths."""
    g = np.random.default_rng(seed)
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(g.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(folder / name)


@pytest.fixture
def my_photos(tmp_path):
    """A nested folder of 7 readable pictures, as users keep them, with what must not count or
    must not hang the listing: a hidden file and folder, a text file, a zero-byte image (listed,
    then skipped as unreadable: with it 8 files, two steps of 4) and a symbolic link back up."""
    root = tmp_path / "photos"
    photos(root, ["2023/summer/a.jpg", "2023/summer/b.JPG", "2023/c.jpeg", "2024/d.png", "2024/deep/e.webp",
                  "2024/deep/f.bmp", "g.tif"])
    (root / ".thumbnails").mkdir()
    photos(root, [".thumbnails/t.jpg", ".hidden.jpg"])
    (root / "notes.txt").write_text("not an image")
    (root / "2024" / "empty.jpg").write_bytes(b"")
    os.symlink("..", root / "2024" / "up")                            # 2024/up/2024/up/... for ImageFolder
    return root


def test_the_listing_counts_each_image_once_at_any_depth(my_photos):
    assert list_images(str(my_photos)) == ["2023/c.jpeg", "2023/summer/a.jpg", "2023/summer/b.JPG", "2024/d.png",
                                           "2024/deep/e.webp", "2024/deep/f.bmp", "2024/empty.jpg", "g.tif"]
    os.symlink(my_photos / "g.tif", my_photos / "2023" / "again.jpg")  # a link to a file is an image
    assert "2023/again.jpg" in list_images(str(my_photos))


def test_a_link_loop_in_a_class_folder_adds_nothing(tmp_path):
    """ImageFolder follows train/a/up -> .. again and again (hundreds of copies of 16 images);
    the class folders here are walked once."""
    root = jpeg_folder(tmp_path / "data", classes=("a", "b"), per_class=8)
    os.symlink("..", root / "train" / "a" / "up")
    os.symlink("../b", root / "train" / "a" / "b_again")
    images = ClassFolders(str(root / "train"))
    assert len(images) == 16 and images.targets == [0] * 8 + [1] * 8 and images.classes == ["a", "b"]


def test_training_on_a_folder_without_labels_runs_two_steps_and_resumes(my_photos, tmp_path, capsys):
    import train
    out = tmp_path / "run"
    train.main(TINY_RUN + ["--data-path", str(my_photos), "--epochs", "1", "--output-dir", str(out)])
    said = capsys.readouterr()
    assert said.out.count("no labels (--dataset unlabelled): the kNN monitor and the neighbor quality are off") == 1
    assert "skipping unreadable training image" in said.err and "empty.jpg" in said.err
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert (ckpt["epoch"], ckpt["train_images"], len(ckpt["train_list_sha256"])) == (1, 8, 64)
    assert int(ckpt["model"]["queue.filled"]) == 8                     # 2 steps of 4, labels unknown
    assert (ckpt["model"]["queue.labels"] == -1).all()
    train.main(TINY_RUN + ["--data-path", str(my_photos), "--epochs", "2", "--output-dir", str(out)])
    line = f"resumed from {out}/checkpoint.pth: epoch 2, step 0 of 2, queue holding 8 keys"
    assert line in capsys.readouterr().out
    log = read_log(out / "log.txt")
    assert [e["epoch"] for e in log] == [1, 2] and log[1]["resumed"] == line
    assert "knn_top1" not in log[1] and "nn_agree" not in log[1] and log[1]["skipped_images"] == 1


def test_a_labelled_monitor_folder_measures_knn_beside_unlabelled_training(my_photos, tmp_path, capsys):
    import train
    labelled = jpeg_folder(tmp_path / "labelled", classes=("a", "b"), per_class=4)
    train.main(TINY_RUN + ["--data-path", str(my_photos), "--monitor-path", str(labelled), "--epochs", "1",
                           "--output-dir", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert "the neighbor quality is off; the kNN monitor reads" in out and "kNN top-1 (epoch 1)" in out
    assert [e["epoch"] for e in read_log(tmp_path / "run" / "log.txt")] == [0, 1]


def test_a_resume_on_other_files_inside_an_epoch_is_refused_and_at_its_end_says_so(my_photos, tmp_path, capsys):
    import train
    out, run = tmp_path / "run", TINY_RUN + ["--data-path", str(my_photos)]
    train.main(run + ["--epochs", "1", "--output-dir", str(out)])
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    ckpt["step_in_epoch"] = 1                                          # as if stopped inside epoch 2
    torch.save(ckpt, out / "checkpoint.pth")
    os.rename(my_photos / "g.tif", my_photos / "g2.tif")                 # the same number, other files
    before = snapshot(out)
    line = fails_in_process(capsys, train.main, run + ["--epochs", "2", "--output-dir", str(out)])
    assert "now holds 8 (the same number, other files): a mid-epoch resume needs the same data set" in line
    assert snapshot(out) == before
    ckpt["step_in_epoch"] = 0                                          # at the epoch's end: go on, and say so
    torch.save(ckpt, out / "checkpoint.pth")
    photos(my_photos, ["new/i.jpg", "new/j.jpg"], seed=3)
    train.main(run + ["--epochs", "2", "--output-dir", str(out)])
    assert f"; {my_photos} now holds 10 training images (the run saw 8 so far)" in capsys.readouterr().out


def _listing_worker(rank, port, roots, out):
    from images.loaders import same_listing_on_every_rank
    from images.folders import ImageFiles
    from runtime import distributed
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    env = distributed.init_distributed("cpu")
    try:
        same_listing_on_every_rank(ImageFiles(roots[rank]), "DATA", env)
        said = "agreed"
    except Exception as e:  # noqa: BLE001 (what each rank met is the result)
        said = f"{type(e).__name__}: {e}"
    pathlib.Path(out, f"rank{rank}.txt").write_text(said)
    distributed.cleanup()


def test_ranks_that_list_different_files_stop_with_one_line(my_photos, tmp_path):
    other = tmp_path / "other"
    photos(other, ["a.jpg", "b.jpg"])
    mp.spawn(_listing_worker, args=(free_port(), [str(my_photos), str(other)], str(tmp_path)), nprocs=2)
    said = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert said[0] == ("DataError: the ranks list different files under DATA (rank 0: 8 files, rank 1: 2 files); "
                       "every node must see the same folder: a shared file system, or the same copy on each")
    assert said[1] == "OtherRankFailed: "                              # quiet: rank 0 says it
    mp.spawn(_listing_worker, args=(free_port(), [str(my_photos)] * 2, str(tmp_path)), nprocs=2)
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)] == ["agreed", "agreed"]


def bad_folders(tmp_path):
    """(data path, what the one line must say) for each folder a careless user gives."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file.jpg").write_bytes(b"")
    photos(tmp_path / "few", ["a.jpg", "b.jpg"])
    (tmp_path / "broken").mkdir()
    for i in range(5):
        (tmp_path / "broken" / f"{i}.jpg").write_bytes(b"not a jpeg" * i)
    (tmp_path / "loop" / "a").mkdir(parents=True)                     # links that lead back inside only
    os.symlink("..", tmp_path / "loop" / "a" / "up")
    os.symlink(".", tmp_path / "loop" / "here")
    return [(tmp_path / "empty", "holds no image files (names ending in .jpg, .jpeg, .png, .bmp, .webp, .tif"),
            (tmp_path / "a_file.jpg", "is a file; give the folder that holds the images"),
            (tmp_path / "missing", "does not exist; give the folder that holds the images"),
            (tmp_path / "few", "2 training images are fewer than one --batch-size 4"),
            (tmp_path / "broken", "none of the 5 image files under"),
            (tmp_path / "loop", "holds no image files")]


def test_bad_folders_end_with_one_line_and_write_nothing(tmp_path, capsys):
    import train
    for path, said in bad_folders(tmp_path):
        out = tmp_path / "out"
        line = fails_in_process(capsys, train.main, TINY_RUN + ["--data-path", str(path), "--output-dir", str(out)])
        assert said in line and str(path) in line, (path, line)
        assert not out.exists(), path


def test_evaluation_and_pictures_need_labels_and_say_so(my_photos, tmp_path):
    import train
    train.main(TINY_RUN + ["--data-path", str(my_photos), "--epochs", "1", "--output-dir", str(tmp_path / "run")])
    ckpt = str(tmp_path / "run" / "checkpoint.pth")
    res = run_cli("eval_linear.py", ckpt, "--device", "cpu", "--output-dir", str(tmp_path / "ev"))
    assert res.returncode == 1 and res.stderr.startswith("error: evaluation needs labels"), res.stderr
    assert "give --dataset folder --data-path DIR" in res.stderr and res.stderr.count("\n") == 1
    res = run_cli("tools/visualize.py", "calibration", ckpt, "--out", str(tmp_path / "c.png"))
    assert res.returncode == 1 and "trained on --dataset unlabelled" in res.stderr and res.stderr.count("\n") == 1
    assert not (tmp_path / "ev").exists() and not (tmp_path / "c.png").exists()
