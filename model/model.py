"""Models named by the config's `arch.type`. torchvision models (e.g. "resnet18") are found as well."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from base import BaseModel
from utils.checkpoint import load_model_weights, load_state_dict_file
from utils.util import UserError, did_you_mean


class ConvNet(BaseModel):
    """Three conv-batchnorm-pool blocks and a small classifier: the default for 28x28 digit images."""

    def __init__(self, num_classes=10, in_channels=1, width=16, dropout=0.3):
        super().__init__()
        blocks = []
        for c_in, c_out in ((in_channels, width), (width, 2 * width), (2 * width, 2 * width)):
            blocks += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
        self.features = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(3), nn.Flatten())
        self.classifier = nn.Sequential(nn.Linear(2 * width * 9, 4 * width), nn.ReLU(inplace=True),
                                        nn.Dropout(dropout), nn.Linear(4 * width, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


class MnistModel(BaseModel):
    """The LeNet-style model of victoresque/pytorch-template; it returns log-probabilities (use nll_loss)."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.conv2_drop = nn.Dropout2d()
        self.fc1 = nn.Linear(320, 50)
        self.fc2 = nn.Linear(50, num_classes)

    def forward(self, x):
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2_drop(self.conv2(x)), 2))
        x = x.view(-1, 320)
        x = F.relu(self.fc1(x))
        x = F.dropout(x, training=self.training)
        x = self.fc2(x)
        return F.log_softmax(x, dim=1)


class TorchvisionClassifier(BaseModel):
    """A torchvision classification model by name with its last linear layer replaced for `num_classes`.

    `weights` names torchvision weights ("DEFAULT", "IMAGENET1K_V1") that are downloaded when online;
    `weights_file` loads a local state dict instead (offline). The new head is trained from scratch; the rest
    is the backbone, which `trainer.freeze_backbone_epochs` can keep frozen at first.
    """

    def __init__(self, name, num_classes, weights=None, weights_file=None, in_channels=3):
        super().__init__()
        import torchvision

        if name not in torchvision.models.list_models():
            raise UserError(f"arch.args.name: no torchvision model {name!r}"
                            f"{did_you_mean(name, torchvision.models.list_models())}")
        if weights:
            choices = torchvision.models.get_model_weights(name)
            known = [n for n in choices.__members__ if n != "DEFAULT"]
            if weights != "DEFAULT" and weights not in known:
                raise UserError(f"arch.args.weights: {name} has no weights {weights!r}; it has DEFAULT, "
                                f"{', '.join(known)}")
            weights = choices[weights]
        try:
            self.net = torchvision.models.get_model(name, weights=weights)
        except ValueError as e:
            raise UserError(f"arch.args: {e}") from None
        except (OSError, RuntimeError) as e:
            raise UserError(f"arch.args.weights: could not download {weights.url} ({e}); offline, put that file in "
                            f"{torch.hub.get_dir()}/checkpoints/ or give a local \"weights_file\"") from None
        if weights_file:
            load_model_weights(self.net, load_state_dict_file(weights_file), weights_file)
        if in_channels != 3:
            conv = next(m for m in self.net.modules() if isinstance(m, nn.Conv2d))
            conv_name = next(n for n, m in self.net.named_modules() if m is conv)
            replacement = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                                    bias=conv.bias is not None)
            _set_module(self.net, conv_name, replacement)
        linear = [(n, m) for n, m in self.net.named_modules() if isinstance(m, nn.Linear)]
        if not linear:
            raise UserError(f"arch.args.name: {name} has no nn.Linear classifier to replace; name its builder as the "
                            f"arch type instead (\"type\": \"{name}\", \"args\": {{\"num_classes\": ...}})")
        head_name, head = linear[-1]
        _set_module(self.net, head_name, nn.Linear(head.in_features, num_classes))
        self.head = self.net.get_submodule(head_name)

    def forward(self, x):
        return self.net(x)

    def set_backbone_trainable(self, trainable):
        head_params = {id(p) for p in self.head.parameters()}
        for p in self.net.parameters():
            if id(p) not in head_params:
                p.requires_grad_(trainable)


class ImageAndFeatures(BaseModel):
    """A torchvision backbone on the image and a small MLP on the feature columns (`data_loader.args.feature_columns`,
    `num_features` of them), joined by one linear layer: forward(image, features). The backbone is built as
    TorchvisionClassifier builds it (`name`, `weights` none by default, `weights_file`, `in_channels`), without its
    classifier; the features pass batch norm first, so columns of any scale work."""

    def __init__(self, num_classes, num_features, name="resnet18", weights=None, weights_file=None, in_channels=3,
                 hidden=64):
        super().__init__()
        classifier = TorchvisionClassifier(name, 1, weights, weights_file, in_channels)
        width = classifier.head.in_features
        _set_module(classifier.net, next(n for n, m in classifier.net.named_modules() if m is classifier.head),
                    nn.Identity())
        self.backbone = classifier.net
        self.features = nn.Sequential(nn.BatchNorm1d(num_features), nn.Linear(num_features, hidden),
                                      nn.ReLU(inplace=True), nn.Linear(hidden, hidden), nn.ReLU(inplace=True))
        self.head = nn.Linear(width + hidden, num_classes)

    def forward(self, image, features):
        return self.head(torch.cat([self.backbone(image), self.features(features)], dim=1))

    def set_backbone_trainable(self, trainable):
        self.backbone.requires_grad_(trainable)


def _set_module(root, dotted_name, module):
    parent_name, _, child = dotted_name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)
