"""The PyTorch side of tools/bench_step.py: the same networks as cmsf_tf.models (torchvision's ResNet
layout, the small-image stem, the width multiplier, Linear-BN-ReLU-Linear heads) and each method's train
step written the way the authors' code writes it (UCDvision/CMSF: self_supervised/train_cmsf_self.py
ConstrainedMeanShiftSelf.forward, supervised/train_cmsf_sup.py, semi_supervised/pseudo_cmsf.py): full
[B, K] distance matrices for targets and queries, the constraint as a B x K scatter or masked
assignment, top-k, gather, SGD with coupled weight decay, EMA of the target in the forward pass.
Benchmark code only: cmsf_tf never imports it.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

import torch_resnet


def ResNet(arch, width=64):
    """The backbone: torchvision's ResNet layout (tools/torch_resnet.py) returning pooled features."""
    return torch_resnet.ResNet(arch, width, num_classes=0)


def mlp(cin, hidden, out):
    return nn.Sequential(nn.Linear(cin, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out))


class MeanShiftStep(nn.Module):
    """One method's train step, the authors' way. `method` in byol, msf, cmsf_2q, cmsf_km, cmsf_sup,
    cmsf_pseudo."""

    def __init__(self, method, arch, width, bank_size, num_images, num_classes, topk=5, topk_prime=5, m=0.99,
                 num_clusters=1000):
        super().__init__()
        self.method, self.m = method, m
        self.topk = 1 if method == "byol" else topk
        self.topk_prime = topk_prime
        self.encoder_q, self.encoder_t = ResNet(arch, width), ResNet(arch, width)
        feat = self.encoder_q.feature_dim
        dim = max(feat // 4, 16)
        self.encoder_q = nn.Sequential(self.encoder_q, mlp(feat, 2 * feat, dim))
        self.encoder_t = nn.Sequential(self.encoder_t, mlp(feat, 2 * feat, dim))
        self.predict_q = mlp(dim, 2 * feat, dim)
        for q, t in zip(self.encoder_q.parameters(), self.encoder_t.parameters()):
            t.data.copy_(q.data)
            t.requires_grad = False
        self.register_buffer("queue", F.normalize(torch.randn(bank_size, dim), dim=1))
        self.register_buffer("labels", -torch.ones(bank_size, dtype=torch.long))
        self.register_buffer("index_queue", torch.zeros(bank_size, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        if method == "cmsf_2q":
            self.register_buffer("pool", torch.randn(2, num_images, dim))
            self.register_buffer("pool_qindex", torch.zeros(num_images, dtype=torch.long))
        if method == "cmsf_km":
            self.register_buffer("cluster_ids", torch.randint(0, num_clusters, (num_images,)))
        if method == "cmsf_pseudo":
            self.pseudo_head = mlp(dim, 2 * dim, num_classes)
            for p in self.pseudo_head.parameters():
                p.requires_grad = False

    @torch.no_grad()
    def _momentum_update(self):
        for q, t in zip(self.encoder_q.parameters(), self.encoder_t.parameters()):
            t.data = t.data * self.m + q.data * (1.0 - self.m)

    @torch.no_grad()
    def _enqueue(self, targets, labels, indices):
        b, ptr = targets.shape[0], int(self.queue_ptr)
        if self.method == "cmsf_2q":
            self.pool[self.pool_qindex[indices], indices, :] = targets
            self.pool_qindex[indices] = (self.pool_qindex[indices] + 1) % 2
        self.queue[ptr:ptr + b] = targets
        self.labels[ptr:ptr + b] = labels
        self.index_queue[ptr:ptr + b] = indices
        self.queue_ptr[0] = (ptr + b) % self.queue.shape[0]

    def forward(self, im_q, im_t, labels, indices):
        query = F.normalize(self.predict_q(self.encoder_q(im_q)), dim=1)
        with torch.no_grad():
            self._momentum_update()
            current_target = F.normalize(self.encoder_t(im_t), dim=1)
            if self.method == "cmsf_pseudo":  # pseudo-labels from the head, confident ones constrain
                probs = F.softmax(self.pseudo_head(current_target), dim=1)
                conf, pseudo = probs.max(dim=1)
                labels = torch.where(conf >= 0.85, pseudo, labels)
            self._enqueue(current_target, labels, indices)
        targets = self.queue.clone().detach()
        dist_t = 2 - 2 * torch.einsum("bc,kc->bk", [current_target, targets])
        dist_q = 2 - 2 * torch.einsum("bc,kc->bk", [query, targets])
        _, nn_unconstrained = dist_t.topk(self.topk, dim=1, largest=False)
        loss_unconstrained = torch.gather(dist_q, 1, nn_unconstrained).sum(dim=1).div(self.topk).mean()
        if self.method in ("byol", "msf"):
            loss, first = loss_unconstrained, nn_unconstrained
        elif self.method == "cmsf_2q":
            targets_prime = self.pool[self.pool_qindex[self.index_queue], self.index_queue, :]
            current_prime = self.pool[self.pool_qindex[indices], indices, :]
            dist_prime = 2 - 2 * torch.einsum("bc,kc->bk", [current_prime, targets_prime])
            _, nn_prime = dist_prime.topk(self.topk_prime, dim=1, largest=False)
            mask = torch.zeros_like(dist_t)
            mask.scatter_(1, nn_prime, -5 * torch.ones_like(dist_t))
            _, first = (dist_t + mask).topk(self.topk, dim=1, largest=False)
            loss = (torch.gather(dist_q, 1, first).sum(dim=1).div(self.topk).mean() + loss_unconstrained) / 2
        else:
            if self.method == "cmsf_km":
                query_ids, bank_ids = self.cluster_ids[indices], self.cluster_ids[self.index_queue]
            else:
                query_ids, bank_ids = labels, self.labels
            b, k = dist_t.shape
            other = query_ids.unsqueeze(1).expand(b, k) != bank_ids.unsqueeze(0).expand(b, k)
            dist_t[torch.where(other)] = 5.0
            _, first = dist_t.topk(self.topk, dim=1, largest=False)
            loss = torch.gather(dist_q, 1, first).mean(dim=1).mean()
            if self.method == "cmsf_km":
                loss = (loss + loss_unconstrained) / 2
        # purity, as the authors' step computes it every iteration
        queue_labels = self.labels.unsqueeze(0).expand(first.shape[0], self.labels.shape[0])
        purity = (torch.gather(queue_labels, 1, first) == labels.unsqueeze(1)).float().mean()
        return loss, purity


class CrossEntropyStep(nn.Module):
    def __init__(self, arch, width, num_classes):
        super().__init__()
        self.backbone = ResNet(arch, width)
        self.fc = nn.Linear(self.backbone.feature_dim, num_classes)

    def forward(self, images, labels):
        logits = self.fc(self.backbone(images))
        return F.cross_entropy(logits, labels), (logits.argmax(1) == labels).float().mean()


def make_step(method, arch, width, bank_size, num_images, num_classes, lr=0.05, weight_decay=1e-4, **kwargs):
    """A zero-argument-per-batch callable: step(batch) trains once on the batch (a dict of tensors)."""
    if method == "xent":
        model = CrossEntropyStep(arch, width, num_classes)
    else:
        model = MeanShiftStep(method, arch, width, bank_size, num_images, num_classes, **kwargs)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)

    def step(batch):
        if method == "xent":
            loss, _ = model(batch["weak"], batch["label"])
        else:
            loss, _ = model(batch["strong"], batch["weak"], batch["label"], batch["index"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step
