"""Models named by the config's `arch.type`. torchvision models (e.g. "resnet18") are found as well."""
import torch.nn as nn
import torch.nn.functional as F

from base import BaseModel


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
