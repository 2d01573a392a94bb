"""fusedres.models.* take torchvision's weights=, progress= and pretrained=, load through torchvision's own code and
convert afterwards. Nothing is downloaded: torchvision's URL loader is replaced by one reading a local file."""
import pytest
import torch
import torchvision
from torchvision.models import ResNet18_Weights

import fusedres
from fusedres.nn.blocks import BasicBlock


@pytest.fixture
def local_checkpoint(tmp_path, monkeypatch):
    """A random resnet18 state_dict saved to disk and served wherever torchvision would download weights."""
    state = torchvision.models.resnet18().state_dict()
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    calls = []

    def load_state_dict_from_url(url, *args, **kwargs):
        calls.append((url, kwargs))
        return torch.load(path, weights_only=True)

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", load_state_dict_from_url)
    return state, calls


def same_tensors(model, state):
    got = model.state_dict()
    assert got.keys() == state.keys()
    return all(torch.equal(got[k], state[k]) for k in state)


@pytest.mark.parametrize("weights,progress", [(ResNet18_Weights.IMAGENET1K_V1, True), ("IMAGENET1K_V1", False),
                                              ("DEFAULT", True), ("ResNet18_Weights.IMAGENET1K_V1", False)])
def test_weights_load_through_torchvision_then_convert(local_checkpoint, weights, progress):
    state, calls = local_checkpoint
    model = fusedres.models.resnet18(weights=weights, progress=progress)
    assert isinstance(model.layer1[0], BasicBlock) and same_tensors(model, state)
    [(url, kwargs)] = calls
    assert url == ResNet18_Weights.IMAGENET1K_V1.url and kwargs["progress"] is progress


def test_pretrained_behaves_as_in_torchvision(local_checkpoint):
    state, calls = local_checkpoint
    with pytest.warns(UserWarning, match="'pretrained' is deprecated"):
        model = fusedres.models.resnet18(pretrained=True)
    assert same_tensors(model, state) and len(calls) == 1
    with pytest.warns(UserWarning, match="'pretrained' is deprecated"):
        model = fusedres.models.resnet18(pretrained=False, num_classes=10)
    assert model.fc.out_features == 10 and len(calls) == 1 and isinstance(model.layer1[0], BasicBlock)


def test_bad_weights_are_torchvision_errors(local_checkpoint):
    with pytest.raises(ValueError, match="unknown weights 'IMAGENET9K'; choose from DEFAULT, IMAGENET1K_V1"):
        fusedres.models.resnet18(weights="IMAGENET9K")
    with pytest.raises(ValueError, match="num_classes"):
        fusedres.models.resnet18(weights="DEFAULT", num_classes=10)  # torchvision: the weights fix num_classes
    assert local_checkpoint[1] == []
