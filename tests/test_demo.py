import h5py
import numpy as np

from badnet_repair import demo
from badnet_repair.evaluate import accuracy


def test_demo_files_have_the_competition_format(demo_dir):
    for key in ("clean_validation", "clean_test", "poisoned_test"):
        with h5py.File(demo_dir / demo.FILES[key], "r") as f:
            assert f["data"].shape[1:] == (3, 55, 47)
            assert f["data"].dtype == np.float32 and f["label"].dtype == np.float32
            assert 0 <= f["data"][()].min() and f["data"][()].max() <= 255
    with h5py.File(demo_dir / demo.FILES["clean_test"], "r") as f:
        assert len(np.unique(f["label"][()])) == demo.NUM_CLASSES >= 20


def test_poisoned_set_targets_one_class_and_holds_none_of_it(demo_dir):
    with h5py.File(demo_dir / demo.FILES["poisoned_test"], "r") as f:
        assert set(np.unique(f["label"][()])) == {demo.TARGET}
    with h5py.File(demo_dir / demo.FILES["clean_test"], "r") as f:
        clean_labels = f["label"][()]
    assert len(clean_labels) - np.sum(clean_labels == demo.TARGET) == len(
        h5py.File(demo_dir / demo.FILES["poisoned_test"], "r")["label"]
    )


def test_demo_badnet_meets_its_targets(demo_model, demo_data):
    _, test, poisoned = demo_data
    assert demo_model.name == "deepid" and demo_model.count_params() > 0
    assert accuracy(demo_model, test) >= 0.90
    assert accuracy(demo_model, poisoned) >= 0.95


def test_existing_demo_folder_is_reused_and_partial_builds_are_not(demo_dir, tmp_path):
    before = (demo_dir / demo.FILES["model"]).stat().st_mtime_ns
    assert demo.ensure(demo_dir) == demo_dir
    assert (demo_dir / demo.FILES["model"]).stat().st_mtime_ns == before
    partial = list(demo_dir.parent.glob(".demo-build-*"))
    assert partial == []
