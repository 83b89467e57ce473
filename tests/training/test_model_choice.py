"""Model choice: torchvision networks with auxiliary heads train; --weights takes a run directory."""
from __future__ import annotations

import pytest
import torch

from training import networks, recipe, train


@pytest.mark.parametrize("name, size", [("torchvision/googlenet", 32), ("torchvision/inception_v3", 75)])
def test_networks_with_auxiliary_heads_give_plain_logits_in_training(name, size):
    model = networks.create_model(name, 3).train()  # was a GoogLeNetOutputs / InceptionOutputs namedtuple
    logits = model(torch.randn(2, 3, size, size))
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 3)
    recipe.ClassificationLoss()(logits, torch.tensor([0, 2])).backward()


def test_googlenet_trains_and_a_run_directory_is_weights(small_digits, tmp_path):
    def run(out, *extra):
        return train.main(train.get_args_parser().parse_args([
            "--data-dir", str(small_digits[0]), "--val-dir", str(small_digits[1]), "--output-dir", str(out),
            "--model", "torchvision/googlenet", "--crop-size", "32", "--resize-size", "32", "--batch-size", "8",
            "--epochs", "1", "--steps-per-epoch", "1", "--workers", "0", "--threads", "2", "--no-progress",
            "--no-tensorboard", *extra]))

    run(tmp_path / "first")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty is a directory without best.pt: --weights takes"):
        networks.create_model("torchvision/googlenet", 10, weights=tmp_path / "empty")
    from_run = networks.create_model("torchvision/googlenet", 10, weights=tmp_path / "first")
    from_file = networks.create_model("torchvision/googlenet", 10, weights=tmp_path / "first" / "best.pt")
    assert all(torch.equal(a, b) for a, b in zip(from_run.state_dict().values(), from_file.state_dict().values()))
    run(tmp_path / "second", "--weights", str(tmp_path / "first"))  # was "weights file ... does not exist"
