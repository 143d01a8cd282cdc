"""The authors' train step of each method, transcribed to PyTorch in their formulation, for tools/parity.py.

Written here from reading (not copied from) the official code at these commits:
  MSF      UMBCvision/MSF   130191c  train_msf.py
  CMSF-2Q  UCDvision/CMSF   7f40a51  self_supervised/train_cmsf_self.py
  CMSF-KM  UMBCvision/CMSF  4aaac18  self_supervised/train_msf_km.py
  sup      UCDvision/CMSF   7f40a51  supervised/train_cmsf_sup.py
  pseudo   UCDvision/CMSF   7f40a51  semi_supervised/pseudo_cmsf.py, train_pseudo_cmsf.py
Every block cites the file and line it follows. Full B x K distance matrices (2 - 2<a, b>), the
constraint as a scatter of -5 (2Q) or as distance 5.0 on disallowed rows (labels, clusters), top-k with
largest=False, gather from the query distances; the EMA of the target at the start of the forward pass;
torch.optim.SGD with coupled weight decay over the parameters that require a gradient.

On one device ShuffleBN (get_shuffle_ids, a permutation of the batch before the target's BatchNorm and
back) changes nothing: BatchNorm sees the same batch in another order. It is left out.
"""

import torch
import torch.nn.functional as F
from torch import nn

import torch_resnet


def get_mlp(inp_dim, hidden_dim, out_dim):
    # train_msf.py:74-81: Linear - BatchNorm1d - ReLU - Linear
    return nn.Sequential(nn.Linear(inp_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, out_dim))


class OfficialStep(nn.Module):
    """encoder_q = ResNet + projector (the authors replace the ResNet's fc by the MLP), encoder_t likewise,
    predict_q; the queue with its labels and image indices; per method the 2Q pool, the KM cluster ids or
    the pseudo-label head."""

    def __init__(self, method, arch, width, hidden, dim, bank_size, num_images, num_classes, topk, topk_prime,
                 m=0.99, conf_threshold=0.85):
        super().__init__()
        self.method, self.m, self.conf_th = method, m, conf_threshold
        self.topk = 1 if method == "byol" else topk
        self.topkp = topk_prime
        feat = width * 8
        self.encoder_q = nn.Sequential(torch_resnet.ResNet(arch, width, num_classes=0), get_mlp(feat, hidden, dim))
        self.encoder_t = nn.Sequential(torch_resnet.ResNet(arch, width, num_classes=0), get_mlp(feat, hidden, dim))
        self.predict_q = get_mlp(dim, hidden, dim)
        for param_t in self.encoder_t.parameters():  # train_msf.py:114-117
            param_t.requires_grad = False
        self.register_buffer("queue", torch.zeros(bank_size, dim))
        self.register_buffer("labels", -torch.ones(bank_size, dtype=torch.long))
        self.register_buffer("gt_labels", -torch.ones(bank_size, dtype=torch.long))  # pseudo_cmsf.py:79
        self.register_buffer("index_queue", -torch.ones(bank_size, dtype=torch.long))  # train_cmsf_self.py:125
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        if method == "cmsf_2q":  # train_cmsf_self.py:119-120
            self.register_buffer("pool", torch.zeros(2, num_images, dim))
            self.register_buffer("pool_qindex", torch.zeros(num_images, dtype=torch.long))
        if method == "cmsf_km":  # train_msf_km.py:154-155
            self.register_buffer("pool", torch.zeros(num_images, dim))
            self.register_buffer("pseudo_labels", torch.zeros(num_images, dtype=torch.long))
        if method == "cmsf_pseudo":  # pseudo_cmsf.py:59 (mlp_xent='mlp')
            self.mlp_head = get_mlp(dim, 2 * dim, num_classes)

    @torch.no_grad()
    def _momentum_update_target_encoder(self):
        # train_msf.py:137-140: parameters only (BatchNorm buffers follow the target's own batches)
        for param_q, param_t in zip(self.encoder_q.parameters(), self.encoder_t.parameters()):
            param_t.data = param_t.data * self.m + param_q.data * (1. - self.m)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, targets, labels, indices, gt_labels):
        # train_msf.py:143-155, train_cmsf_self.py:141-155 (2Q pool: 148-149), train_msf_km.py:182-195
        # (KM pool: 189), pseudo_cmsf.py:108-120 (gt_labels beside the pseudo-labels)
        b, ptr = targets.shape[0], int(self.queue_ptr)
        if self.method == "cmsf_2q":
            self.pool[self.pool_qindex[indices], indices, :] = targets
            self.pool_qindex[indices] = (self.pool_qindex[indices] + 1) % 2
        if self.method == "cmsf_km":
            self.pool[indices, :] = targets
        self.queue[ptr:ptr + b] = targets
        self.labels[ptr:ptr + b] = labels
        self.gt_labels[ptr:ptr + b] = gt_labels
        self.index_queue[ptr:ptr + b] = indices
        self.queue_ptr[0] = (ptr + b) % self.queue.shape[0]

    def forward(self, im_q, im_t, labels, true_labels, indices, is_labelled):
        """(loss, [neighbour index sets, constrained first], details) of one step. `labels`: training labels
        (-1 unlabelled); `true_labels`: for the purity queue only."""
        # train_msf.py:161-165: query = normalize(predict_q(encoder_q(im_q)))
        query = F.normalize(self.predict_q(self.encoder_q(im_q)), dim=1)
        with torch.no_grad():
            self._momentum_update_target_encoder()  # train_msf.py:169: EMA first, then the target's forward
            current_target = F.normalize(self.encoder_t(im_t), dim=1)  # :176-177 (ShuffleBN: module doc)
            details = {"targets": current_target}
            bank_labels = labels
            if self.method == "cmsf_pseudo":
                # pseudo_cmsf.py:174-201: the head's top-1 class (head in eval mode: train_pseudo_cmsf.py:269);
                # labelled images keep their label; unlabelled ones below the threshold get -1 in the queue
                prob = F.softmax(self.mlp_head(current_target), -1)
                conf, pred = prob.max(dim=1)
                not_conf = (conf < self.conf_th) & (is_labelled == 0)
                bank_labels = torch.where(is_labelled > 0, labels, torch.where(not_conf, -1, pred))
                details["query_labels"] = bank_labels
            self._dequeue_and_enqueue(current_target, bank_labels, indices, true_labels)

        targets = self.queue.clone().detach()
        dist_t = 2 - 2 * torch.einsum("bc,kc->bk", [current_target, targets])  # train_msf.py:188-189
        dist_q = 2 - 2 * torch.einsum("bc,kc->bk", [query, targets])
        _, unconstrained = dist_t.topk(self.topk, dim=1, largest=False)  # train_msf.py:192
        loss_unconstrained = (torch.gather(dist_q, 1, unconstrained).sum(dim=1) / self.topk).mean()  # :193, 201
        if self.method in ("msf", "byol"):
            return loss_unconstrained, [unconstrained], details

        if self.method == "cmsf_2q":
            # train_cmsf_self.py:193-205: previous views of the bank rows and of the batch from the pool,
            # the k' nearest previous views, -5 on them, top-k of the shifted distances
            targets_prime = self.pool[self.pool_qindex[self.index_queue], self.index_queue, :]
            current_target_prime = self.pool[self.pool_qindex[indices], indices, :]
            dist_t_prime = 2 - 2 * torch.einsum("bc,kc->bk", [current_target_prime, targets_prime])
            _, nn_index_prime = dist_t_prime.topk(self.topkp, dim=1, largest=False)
            dist_prime = torch.zeros_like(dist_t)
            dist_prime.scatter_(1, nn_index_prime, -5 * torch.ones_like(dist_t))
            dist_t = dist_t + dist_prime
            _, constrained = dist_t.topk(self.topk, dim=1, largest=False)
            details["candidates"] = nn_index_prime
            # :208-209: the two halves
            loss = ((torch.gather(dist_q, 1, constrained).sum(dim=1) / self.topk).mean() + loss_unconstrained) / 2.0
            return loss, [constrained, unconstrained], details

        if self.method == "cmsf_km":
            # train_msf_km.py:226-259: the cluster ids of the batch and of the bank rows (through their image
            # indices), distance 5.0 for other clusters, the two halves
            query_ids, row_ids = self.pseudo_labels[indices], self.pseudo_labels[self.index_queue]
            msk = query_ids.unsqueeze(1) != row_ids.unsqueeze(0)
            dist_t[torch.where(msk)] = 5.0
            _, constrained = dist_t.topk(self.topk, dim=1, largest=False)
            loss = ((torch.gather(dist_q, 1, constrained).sum(dim=1) / self.topk).mean() + loss_unconstrained) / 2.0
            return loss, [constrained, unconstrained], details

        # cmsf_sup (train_cmsf_sup.py:169-199) and cmsf_pseudo (pseudo_cmsf.py:208-254): rows of another
        # label at distance 5.0; pseudo: a query without a confident label is not constrained (:229-230)
        msk = labels.unsqueeze(1) != self.labels.unsqueeze(0)
        if self.method == "cmsf_pseudo":
            query_labels = details["query_labels"]
            msk = query_labels.unsqueeze(1) != self.labels.unsqueeze(0)
            msk[query_labels < 0] = False
        dist_t[torch.where(msk)] = 5.0
        _, constrained = dist_t.topk(self.topk, dim=1, largest=False)
        loss = torch.gather(dist_q, 1, constrained).mean(dim=1).mean()  # train_cmsf_sup.py:196-199
        return loss, [constrained, unconstrained], details


def make_optimizer(step, lr, momentum, weight_decay):
    # train_msf.py:338-342: SGD over the parameters that require a gradient, coupled weight decay
    return torch.optim.SGD([p for p in step.parameters() if p.requires_grad], lr=lr, momentum=momentum,
                           weight_decay=weight_decay)


def pseudo_label_round(head, features, labels, orders, lr, milestones, batch_size, momentum=0.9, weight_decay=1e-4):
    """One round of the pseudo-label head's training as semi_supervised/pseudo_label_train.py:10-98 runs it:
    a new SGD per round over the head's parameters (:35-38), MultiStepLR stepped per pass (:41-43, :98),
    the head in training mode (:16), n // batch_size batches per pass from a permutation (:52-58: the last
    partial batch is dropped), cross-entropy (:76). `orders[epoch]` replaces torch.randperm (:55), so both
    sides see the same batches; rows labelled -1 would become class 0 (:71-72)."""
    optimizer = torch.optim.SGD(head.parameters(), lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(milestones))
    head.train()
    features, labels = torch.as_tensor(features), torch.as_tensor(labels, dtype=torch.long)
    for order in orders:
        order = torch.as_tensor(order, dtype=torch.long)
        for idx in range(len(features) // batch_size):
            ids = order[idx * batch_size:(idx + 1) * batch_size]
            target = labels[ids].clone()
            target[target == -1] = 0
            loss = F.cross_entropy(head(features[ids]), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        scheduler.step()
