"""Your own network (an import path, a class or an instance) and fine-tuning (--init-from,
--freeze): the guide's pipeline reused, as the guide means it to be."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from conftest import assert_one_sentence_error, last_json, run_main

import torchmnist
from torchmnist import setup
from torchmnist.storage import checkpoint

NETS = '''
import torch.nn.functional as F
from torch import nn


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 5)
        self.fc = nn.Linear(8 * 12 * 12, 10)

    def forward(self, x):
        x = F.relu(F.max_pool2d(self.conv(x), 2))
        return F.log_softmax(self.fc(x.flatten(1)), dim=1)


class Logits(TinyNet):
    def forward(self, x):
        x = F.relu(F.max_pool2d(self.conv(x), 2))
        return self.fc(x.flatten(1))  # forgot log_softmax
'''


@pytest.fixture
def nets(tmp_path, monkeypatch):
    (tmp_path / "mynets.py").write_text(textwrap.dedent(NETS))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("mynets", None)


def test_your_own_model_by_import_path_trains_and_is_recorded(nets, capsys):
    code, out, err = run_main(["train", "--dry-run", "--model", "mynets:TinyNet", "--run-dir",
                               "r", "--json"], capsys)
    assert code == 0, err
    assert last_json(out)["model"] == "mynets:TinyNet"
    assert checkpoint.load("r/last.pt")["config"]["model"] == "mynets:TinyNet"


def test_a_checkpoint_of_your_model_loads_only_when_you_name_it_again(nets, capsys):
    assert run_main(["train", "--dry-run", "--model", "mynets:TinyNet", "--run-dir", "r"],
                    capsys)[0] == 0
    for command in (["test", "r"], ["train", "--resume", "r", "--epochs", "2"]):
        code, _, err = run_main(command, capsys)
        assert code == 2
        assert_one_sentence_error(err, "mynets:TinyNet", "--model mynets:TinyNet",
                                  "imports no code")
    code, _, err = run_main(["train", "--resume", "r", "--epochs", "2", "--model",
                             "mynets:TinyNet"], capsys)
    assert code == 0, err
    code, _, err = run_main(["test", "r", "--model", "mynets:TinyNet"], capsys)
    assert code == 0, err


def test_an_instance_is_trained_as_given(nets):
    import mynets

    network = mynets.TinyNet()
    result = torchmnist.train(torchmnist.TrainConfig(dry_run=True, quiet=True, run_dir="r",
                                                     device="cpu"), model=network)
    assert result.model is network
    assert result["model"] == "mynets:TinyNet"


@pytest.mark.parametrize("model, fragment", [
    ("mynets:Logits", "must return log-probabilities"),
    ("mynets:Nothing", "does not name an nn.Module class"),
    ("nosuchpackage:Net", "cannot import nosuchpackage"),
    ("not an import path", "or an import path such as mypackage.nets:MyNet"),
])
def test_a_model_that_cannot_work_is_refused_in_one_sentence(model, fragment, nets, capsys):
    code, _, err = run_main(["train", "--dry-run", "--model", model, "--run-dir", "r"], capsys)
    assert code == 2
    assert_one_sentence_error(err, fragment)


# ---- fine-tuning ----------------------------------------------------------------------------


def _weights(path):
    return checkpoint.load(path)["model"]


def test_init_from_starts_from_the_weights_and_freeze_keeps_them(capsys):
    assert run_main(["train", "--dry-run", "--recipe", "fast", "--run-dir", "base", "--device",
                     "cpu"], capsys)[0] == 0
    code, out, err = run_main(["train", "--dry-run", "--recipe", "fast", "--seed", "7",
                               "--init-from", "base", "--freeze", "conv1,bn1,conv2",
                               "--run-dir", "tuned", "--device", "cpu"], capsys)
    assert code == 0, err
    assert "initial weights from base/last.pt" in out
    base, tuned = _weights("base/last.pt"), _weights("tuned/last.pt")
    for name in ("conv1.weight", "bn1.weight", "bn1.bias", "conv2.weight"):
        assert torch.equal(base[name], tuned[name]), name  # frozen: bit for bit
    assert not torch.equal(base["fc.weight"], tuned["fc.weight"])  # trained on
    assert not torch.equal(base["bn2.weight"], tuned["bn2.weight"])
    optimizer = checkpoint.load("tuned/last.pt")["optimizer"]
    trained_tensors = sum(len(group["params"]) for group in optimizer["param_groups"])
    assert trained_tensors == 4  # bn2 weight and bias, fc weight and bias


def test_init_from_a_different_model_is_refused(capsys):
    assert run_main(["train", "--dry-run", "--run-dir", "guide"], capsys)[0] == 0
    code, _, err = run_main(["train", "--dry-run", "--recipe", "fast", "--init-from", "guide",
                             "--run-dir", "r"], capsys)
    assert code == 2
    assert_one_sentence_error(err, "--init-from guide/last.pt does not fit this model")


def test_freeze_names_the_parameters_when_a_prefix_matches_none(capsys):
    code, _, err = run_main(["train", "--dry-run", "--freeze", "conv9", "--run-dir", "r"],
                            capsys)
    assert code == 2
    assert_one_sentence_error(err, "--freeze conv9", "no parameter", "conv1.weight")


def test_a_final_layer_for_another_number_of_classes_starts_afresh(tmp_path):
    from torch import nn

    torch.manual_seed(0)
    ten = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))
    torch.save(ten.state_dict(), tmp_path / "ten.pt")
    five = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 26 * 26, 5))
    fresh = five[2].weight.clone()
    line = setup._load_initial_weights(five, str(tmp_path / "ten.pt"))
    assert "except 2 (another number of classes), which starts afresh" in line
    assert torch.equal(five[0].weight, ten[0].weight)
    assert torch.equal(five[2].weight, fresh)
