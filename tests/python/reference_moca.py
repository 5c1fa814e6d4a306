"""A plain-PyTorch reference of one MOCA pretraining iteration (moca-spec §1-§7, §13, §14).

It is written from the specification, not from the original code, and is the yardstick the
C++ trainer is checked against (tests/data/moca_reference.safetensors). Everything runs in
the dtype of the module (float64 for the fixture), on one process; all randomness (masks,
codebook-update view, images and tokens) is supplied by the caller, so an iteration is a pure
function of (state, inputs, plan, schedule).

State-dict names are those of the official checkpoints (spec §11.6).
"""
from collections import OrderedDict

import torch
import torch.nn as nn

from reference_vit import Block, VisionTransformer, sincos_2d

NORMALIZE_EPS = 1e-5   # every L1/L2 normalisation of the codebook and the generators (spec §11.4)
DIST_NORM_DECAY = 0.99
CLIP_MAX_NORM = 0.1
LR_WGEN = 1e-4         # generator groups: constant lr and weight decay (spec §7.1)
WD_WGEN = 0.05


def l2_normalize(x, eps=NORMALIZE_EPS):
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def l1_normalize(x, eps=NORMALIZE_EPS):
    return x / x.abs().sum(dim=-1, keepdim=True).clamp_min(eps)


def len_keep(L, ratio):
    """floor(L * (1 - ratio)) in double precision, like Python's int() (spec §2.1)."""
    return int(L * (1 - ratio))


def complementary_second_round(s1, lk1, ld1, lk2):
    """Spec §2.2: from round 1's permutation s1 [N, L] build s2 = cat(Cv, Bm, R[lk2:], A) with
    A = s1[:lk1], Bm = s1[lk1:ld1], R = s1[ld1:], Cv = R[:lk2]."""
    L = s1.shape[1]
    assert L - ld1 >= lk2, "complementary masking needs |R| >= lk2"
    A, Bm, R = s1[:, :lk1], s1[:, lk1:ld1], s1[:, ld1:]
    return torch.cat([R[:, :lk2], Bm, R[:, lk2:], A], dim=1)


def inner_patches(grid, skip_offset):
    """Patch indices of rows and columns skip_offset .. grid-1-skip_offset, row-major (§4.3)."""
    keep = range(skip_offset, grid - skip_offset)
    return torch.tensor([r * grid + c for r in keep for c in keep], dtype=torch.long)


def kl_batchmean(target, log_pred):
    """PyTorch KLDiv 'batchmean' with 0 log 0 = 0: sum over everything / number of rows."""
    return (torch.xlogy(target, target) - target * log_pred).sum() / target.shape[0]


class BoWLevel(nn.Module):
    """One codebook level (`bow_extractor.bow_extractor.0`): buffers only, no gradient."""

    def __init__(self, num_words, dim, grid, skip_offset, inv_delta, words_per_iter):
        super().__init__()
        self.register_buffer("_embedding", torch.zeros(num_words, dim))
        self.register_buffer("_embedding_ptr", torch.zeros(1, dtype=torch.long))
        self.register_buffer("_track_num_batches", torch.zeros(1))
        self.register_buffer("_dist_norm", torch.full([1], 0.5))
        self.register_buffer("_dist_norm_prev", torch.full([1], 0.5))
        self.inv_delta = inv_delta
        self.words_per_iter = words_per_iter
        self.inner = inner_patches(grid, skip_offset)
        assert num_words % words_per_iter == 0

    def init_codebook(self):
        """Spec §4.1: Gaussian clamped at 0, rows L2-normalised."""
        self._embedding.copy_(l2_normalize(torch.randn_like(self._embedding).clamp_min(0)))

    @torch.no_grad()
    def assign(self, teacher_out, edict):
        """Spec §4.2-§4.3 for one view: returns codes q [N, L, K], BoW y [N, K] and the batch
        statistic t; updates dist_norm (EMA). Uses dist_norm_prev for the temperature."""
        x = l2_normalize(teacher_out[:, 1:])
        dist = -(x @ edict.t())
        t = (dist.mean(-1) - dist.min(-1).values).mean().abs()
        self._dist_norm.mul_(DIST_NORM_DECAY).add_((1 - DIST_NORM_DECAY) * t)
        q = torch.softmax(-(self.inv_delta / self._dist_norm_prev) * dist, dim=-1)
        y = l1_normalize(q[:, self.inner.to(q.device)].mean(dim=1))
        return q, y, t

    @torch.no_grad()
    def update(self, teacher_out, img_idx, inner_idx):
        """Spec §4.4: FIFO write of L2-normalised teacher tokens teacher_out[img_idx, 1 + inner
        patch], ptr advance, dist_norm_prev <- dist_norm, counter + 1."""
        n = self.words_per_iter
        assert img_idx.numel() == n and inner_idx.numel() == n
        tokens = 1 + self.inner.to(inner_idx.device)[inner_idx]
        words = l2_normalize(teacher_out[img_idx, tokens])
        ptr = int(self._embedding_ptr.item())
        self._embedding[ptr:ptr + n] = words
        self._embedding_ptr.fill_((ptr + n) % self._embedding.shape[0])
        self._dist_norm_prev.copy_(self._dist_norm)
        self._track_num_batches.add_(1)
        return tokens


class BoWExtractor(nn.Module):
    def __init__(self, level):
        super().__init__()
        self.bow_extractor = nn.ModuleList([level])


class WeightGenerator(nn.Module):
    """`layers_w.0`: residual MLP Z -> ReLU(BN(Z W1^T)) W2^T + b2 + skip(Z) (spec §5)."""

    def __init__(self, cin, hidden, cout):
        super().__init__()
        self.generator = nn.Sequential(OrderedDict([
            ("b0_fc", nn.Linear(cin, hidden, bias=False)),
            ("b0_bn", nn.BatchNorm1d(hidden, eps=1e-5, momentum=0.1)),
            ("b0_relu", nn.ReLU()),
            ("b0_last_layer", nn.Linear(hidden, cout)),
        ]))
        self.skip = nn.Identity() if cin == cout else nn.Linear(cin, cout)

    def forward(self, z):
        return self.generator(z) + self.skip(z)


class Predictor(nn.Module):
    """`encoder_pred` (G^b) / `decoder_pred` (G^d): prototypes W = l2norm(gen(l2norm(E)));
    logits = (kappa f) W^T with a fixed kappa `scale` [1]."""

    def __init__(self, cin, hidden, cout, kappa):
        super().__init__()
        self.scale = nn.Parameter(torch.full([1], float(kappa)), requires_grad=False)
        self.layers_w = nn.ModuleList([WeightGenerator(cin, hidden, cout)])

    def prototypes(self, edict):
        return l2_normalize(self.layers_w[0](l2_normalize(edict)))

    def logits(self, features, protos):
        return (self.scale * features) @ protos.t()


class Moca(nn.Module):
    def __init__(self, img_size=224, patch=16, in_chans=3, dim=768, depth=12, heads=12,
                 dec_dim=512, dec_depth=2, dec_heads=16, early_layer=4, num_words=4096,
                 skip_offset=2, kappa=3.0, inv_delta=10.0, words_per_iter=4, pred_mlp_ratio=2.0,
                 mask_ratio=(0.55, 0.75), dec_mask_ratio=(0.35, 0.55), img_weight=0.5,
                 loc_weight=0.5):
        super().__init__()
        grid = img_size // patch
        self.L = grid * grid
        self.early_layer = early_layer
        self.img_weight, self.loc_weight = img_weight, loc_weight
        self.lk = [len_keep(self.L, r) for r in mask_ratio]
        self.ld = [len_keep(self.L, r) for r in dec_mask_ratio]
        assert all(d > k for d, k in zip(self.ld, self.lk))

        self.encoder = VisionTransformer(img_size, patch, in_chans, dim, depth, heads)
        self.encoder_teacher = VisionTransformer(img_size, patch, in_chans, dim, depth, heads)
        for p in self.encoder_teacher.parameters():
            p.requires_grad_(False)
        self.bow_extractor = BoWExtractor(
            BoWLevel(num_words, dim, grid, skip_offset, inv_delta, words_per_iter))
        hidden = int(dim * pred_mlp_ratio)   # both generators use the encoder width (spec §5)
        self.encoder_pred = Predictor(dim, hidden, dim, kappa)
        self.decoder_pred = Predictor(dim, hidden, dec_dim, kappa)
        self.decoder_pos_embed = nn.Parameter(sincos_2d(dec_dim, grid).float().unsqueeze(0),
                                              requires_grad=False)
        self.norm_cls_pt = nn.LayerNorm(dim, eps=1e-6)
        self.decoder_embed_cls_pt = nn.Linear(dim, dec_dim)
        self.mask_token_cls_pt = nn.Parameter(torch.zeros(1, 1, dec_dim))
        self.decoder_blocks_cls_pt = nn.ModuleList(
            [Block(dec_dim, dec_heads, 4.0, 1e-6) for _ in range(dec_depth)])
        self.decoder_norm_cls_pt = nn.LayerNorm(dec_dim, eps=1e-6)

    @property
    def bow(self):
        return self.bow_extractor.bow_extractor[0]

    @torch.no_grad()
    def init_weights(self):
        """Spec §1.6: Xavier Linear weights / zero biases everywhere, LayerNorm 1/0, patch conv
        Xavier on its 2-D view (bias keeps the default init), cls and mask tokens N(0, 0.02),
        codebook §4.1, teacher an exact copy of the student."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for vit in (self.encoder, self.encoder_teacher):
            w = vit.patch_embed.proj.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.encoder.cls_token, std=0.02)
        nn.init.normal_(self.mask_token_cls_pt, std=0.02)
        self.bow.init_codebook()
        self.encoder_teacher.load_state_dict(self.encoder.state_dict())

    def trainable(self):
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    @torch.no_grad()
    def update_teacher(self, m):
        """theta_T <- m theta_T + (1 - m) theta_S over the student's trainable parameters."""
        teacher = dict(self.encoder_teacher.named_parameters())
        for name, p in self.encoder.named_parameters():
            if p.requires_grad:
                teacher[name].mul_(m).add_((1 - m) * p)

    def decode(self, g, mid, s, lk, ld):
        """Condenser decoder of spec §6.4 for one round; returns [N * ld, Dd]."""
        u = torch.cat([g[:, None, :], self.norm_cls_pt(mid[:, 1:, :])], dim=1)
        v = self.decoder_embed_cls_pt(u)
        n, dd = v.shape[0], v.shape[2]
        pd = self.decoder_pos_embed[0]
        tokens = torch.cat([v[:, 1:, :], self.mask_token_cls_pt.expand(n, ld - lk, dd)], dim=1)
        tokens = tokens + pd[1 + s[:, :ld]]
        seq = torch.cat([v[:, :1, :] + pd[0], tokens], dim=1)
        for blk in self.decoder_blocks_cls_pt:
            seq = blk(seq)
        return self.decoder_norm_cls_pt(seq)[:, 1:, :].reshape(n * ld, dd)


def student_losses(model, X, masks, Q, Y, edict, detach_g_for_loc=False):
    """Student side of spec §13 for fixed targets Q [2B, L, K], Y [2B, K], codebook snapshot
    edict and masks [(s_r, lk_r, ld_r)]. Both generators run once (BatchNorm in train mode)."""
    wb = model.encoder_pred.prototypes(edict)
    wd = model.decoder_pred.prototypes(edict)
    offsets = (model.early_layer, 0)
    K = Q.shape[-1]
    out = dict(Wb=wb, Wd=wd, g=[], dec_out=[], l_img_r=[], l_loc_r=[])
    l_img = l_loc = 0
    for s, lk, ld in masks:
        z = model.encoder(X, s[:, :lk], offsets)
        mid, last = z[model.early_layer], z[0]
        g = last[:, 1:, :].mean(dim=1)
        li = kl_batchmean(Y, torch.log_softmax(model.encoder_pred.logits(g, wb), dim=-1))
        dec = model.decode(g.detach() if detach_g_for_loc else g, mid, s, lk, ld)
        tgt = torch.gather(Q, 1, s[:, :ld, None].expand(-1, -1, K)).reshape(-1, K)
        ll = kl_batchmean(tgt, torch.log_softmax(model.decoder_pred.logits(dec, wd), dim=-1))
        l_img, l_loc = l_img + li, l_loc + ll
        out["g"].append(g)
        out["dec_out"].append(dec)
        out["l_img_r"].append(li)
        out["l_loc_r"].append(ll)
    out.update(l_img=l_img, l_loc=l_loc,
               loss=model.img_weight * l_img + model.loc_weight * l_loc)
    return out


def param_groups(model):
    """Spec §7.1: decay / no_decay (ndim <= 1 or '.bias') x regular / wgen."""
    groups = OrderedDict((k, []) for k in ("decay", "no_decay", "wgen_decay", "wgen_no_decay"))
    for name, p in model.trainable():
        wgen = name.startswith("encoder_pred.layers_w.") or name.startswith("decoder_pred.layers_w.")
        no_decay = p.ndim <= 1 or name.endswith(".bias")
        groups[("wgen_" if wgen else "") + ("no_decay" if no_decay else "decay")].append(p)
    return groups


def make_optimizer(model):
    groups = [dict(params=ps, name=k, lr=0.0, weight_decay=0.0)
              for k, ps in param_groups(model).items()]
    return torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.999), eps=1e-8)


def set_schedule(optimizer, lr, wd):
    for g in optimizer.param_groups:
        if g["name"].startswith("wgen"):
            g["lr"] = LR_WGEN
            g["weight_decay"] = WD_WGEN if g["name"] == "wgen_decay" else 0.0
        else:
            g["lr"] = lr
            g["weight_decay"] = wd if g["name"] == "decay" else 0.0


@torch.no_grad()
def teacher_targets(model, x1, x2, edict):
    """Teacher forwards on the unmasked views and the per-view codes / BoW (dist_norm EMA
    runs once per view, view 1 first)."""
    t1 = model.encoder_teacher(x1)[0]
    t2 = model.encoder_teacher(x2)[0]
    q1, y1, st1 = model.bow.assign(t1, edict)
    q2, y2, st2 = model.bow.assign(t2, edict)
    return dict(teacher_out1=t1, teacher_out2=t2, q1=q1, q2=q2, y1=y1, y2=y2, stat1=st1, stat2=st2)


def train_iteration(model, optimizer, batch, plan, sched):
    """One iteration of spec §13.

    batch: x1, x2 [B, C, H, W]. plan: s1 [2B, L] (round-1 permutation), view (0/1: teacher
    output feeding the codebook update), img_idx [Knew] (distinct images), tok_idx [Knew]
    (index into the row-major inner region). sched: lr, wd, momentum.
    Returns the intermediates, the gradients before clipping and the pre-clip norm."""
    set_schedule(optimizer, sched["lr"], sched["wd"])
    m = sched["momentum"]
    if m < 1.0:
        model.update_teacher(m)
    edict = model.bow._embedding.detach().clone()
    x1, x2 = batch["x1"], batch["x2"]
    rec = teacher_targets(model, x1, x2, edict)
    upd = rec["teacher_out1"] if int(plan["view"]) == 0 else rec["teacher_out2"]
    rec["tok"] = model.bow.update(upd, plan["img_idx"], plan["tok_idx"])
    Q = torch.cat([rec["q1"], rec["q2"]])
    Y = torch.cat([rec["y2"], rec["y1"]])

    X = torch.cat([x1, x2])
    s1 = plan["s1"]
    s2 = complementary_second_round(s1, model.lk[0], model.ld[0], model.lk[1])
    masks = [(s1, model.lk[0], model.ld[0]), (s2, model.lk[1], model.ld[1])]
    optimizer.zero_grad(set_to_none=True)
    out = student_losses(model, X, masks, Q, Y, edict)
    out["loss"].backward()
    trainable = model.trainable()
    grads = OrderedDict((n, p.grad.detach().clone()) for n, p in trainable)
    norm = torch.nn.utils.clip_grad_norm_([p for _, p in trainable], CLIP_MAX_NORM)
    optimizer.step()
    rec.update(out)
    rec.update(s2=s2, Q=Q, Y=Y, edict=edict, grads=grads, grad_norm=norm.detach())
    return rec
