"""What the weak labels and the embeddings look like, step by step, without a host read (docs/diagnostics.md).

Every training step adds, on the device, numerators and denominators of these statistics to one [2, E]
tensor (`Diagnostics.sums`); wcl_fast.log.StepMeter reads it with the loss terms at the log interval's one
sync point and logs numerator sum / denominator sum over the interval (and over ranks):

- the weak-label graph (WCL; docs/wcl.md §2-3): components per labelling, their mean and largest size, the
  share of nodes in singleton components (0 for a 1-NN graph: every node has an edge), the adjusted Rand
  index (Hubert & Arabie 1985) of the two views' partitions and the share of the 1-NN edges both views'
  graphs hold;
- the weak labels against the classes, where the training batch carries them (label >= 0 and at least two
  classes in the batch): precision and recall of the weak-label positive pairs (i != j, same component)
  against the same-class pairs, and the purity of the components;
- the embeddings of every objective: the collapse statistic std * sqrt(d) of the L2-normalised rows (about 1
  for spread-out embeddings, 0 for a collapsed head; the standard deviation over the batch per dimension,
  averaged over dimensions), the mean cosine similarity of the two views of an image and of different images.

Labels are read for these statistics only; no objective sees them. Group sizes come from scatter_add over
node ids (labels are node ids < N), pairs of labellings from a sort of the combined keys (O(N log N), not an
N x N contingency table).
"""
from __future__ import annotations

import math

import torch

import kernels
from wcl_fast import dist as wdist

GRAPH_NAMES = ("wl_components", "wl_mean_size", "wl_max_size", "wl_singletons", "wl_view_ari", "wl_edge_agreement")
TRUTH_NAMES = ("wl_precision", "wl_recall", "wl_purity")
EMBEDDING_NAMES = ("collapse_z", "pos_cos_z", "neg_cos_z", "collapse_u", "pos_cos_u", "neg_cos_u")


# ---- statistics of partitions: labels [N] int64 with values in [0, N) (component labels are node ids) ----

def group_sizes(ids: torch.Tensor, num: int, weight: torch.Tensor | None = None) -> torch.Tensor:
    """float64 [num]: how many nodes (or how much `weight`) each id in [0, num) holds."""
    values = torch.ones_like(ids, dtype=torch.float64) if weight is None else weight.to(torch.float64)
    return torch.zeros(num, dtype=torch.float64, device=ids.device).scatter_add_(0, ids, values)


def ordered_pairs(sizes: torch.Tensor) -> torch.Tensor:
    """Ordered pairs (i, j), i != j, inside the same group: sum of s (s - 1) over the group sizes."""
    return (sizes * (sizes - 1)).sum()


def compact(keys: torch.Tensor) -> torch.Tensor:
    """Ids in [0, len(keys)) with equal ids exactly for equal keys (any int64 values), from one sort."""
    order = torch.argsort(keys)
    ordered = keys[order]
    new = torch.ones_like(ordered)
    new[1:] = (ordered[1:] != ordered[:-1]).to(new.dtype)
    return torch.empty_like(order).scatter_(0, order, torch.cumsum(new, 0) - 1)


def partition_summary(labels: torch.Tensor) -> torch.Tensor:
    """float64 [4]: number of components, nodes, largest component size, nodes in singleton components."""
    sizes = group_sizes(labels, labels.shape[0])
    return torch.stack([(sizes > 0).sum().to(torch.float64), sizes.sum(), sizes.max(), (sizes == 1).sum().to(torch.float64)])


def adjusted_rand_index(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Adjusted Rand index of two partitions of the same N nodes (float64 scalar; 1 for equal partitions),
    in the pair-counting form scikit-learn's adjusted_rand_score uses: with the ordered pairs in the same
    group of both (tp), of b only (fp), of a only (fn) and of neither (tn),
    ARI = 2 (tp tn - fn fp) / ((tp + fn)(fn + tn) + (tp + fp)(fp + tn)).
    The cells of the contingency table are the distinct keys a * N + b, numbered by `compact`."""
    n = a.shape[0]
    in_a, in_b = ordered_pairs(group_sizes(a, n)), ordered_pairs(group_sizes(b, n))
    tp = ordered_pairs(group_sizes(compact(a * n + b), n))
    fn, fp = in_a - tp, in_b - tp
    tn = n * (n - 1) - in_a - in_b + tp
    numerator = 2 * (tp * tn - fn * fp)
    denominator = (tp + fn) * (fn + tn) + (tp + fp) * (fp + tn)  # 0 only when fn = fp = 0
    identical = (fn == 0) & (fp == 0)
    return torch.where(identical, torch.ones_like(tp), numerator / torch.where(identical, torch.ones_like(tp), denominator))


def shared_edges(nn1: torch.Tensor, nn2: torch.Tensor) -> torch.Tensor:
    """Share (float64) of the 2N directed 1-NN edges i -> nn_v(i) of both views whose undirected edge is also
    an edge of the other view's graph (nn_w(i) = nn_v(i) or nn_w(nn_v(i)) = i)."""
    nodes = torch.arange(nn1.shape[0], device=nn1.device)
    in_second = (nn2 == nn1) | (nn2[nn1] == nodes)
    in_first = (nn1 == nn2) | (nn1[nn2] == nodes)
    return (in_second.sum() + in_first.sum()).to(torch.float64) / (2 * nn1.shape[0])


def truth_counts(components: torch.Tensor, classes: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """float64 [5] over the nodes with `valid` labels: ordered pairs in the same component and class (tp), in
    the same component, in the same class; sum over components of their majority class's members; nodes.
    components [N] in [0, N); classes [N] any int64 values (compacted here); valid [N] bool."""
    n = components.shape[0]
    weight = valid.to(torch.float64)
    class_ids = compact(classes)
    cells = compact(components * n + class_ids)  # the (component, class) cells of the contingency table
    cell_sizes = group_sizes(cells, n, weight)
    cell_component = torch.zeros_like(cells).scatter_(0, cells, components)  # equal within a cell
    majority = torch.zeros(n, dtype=torch.float64, device=components.device).scatter_reduce_(
        0, cell_component, cell_sizes, reduce="amax")
    return torch.stack([ordered_pairs(cell_sizes), ordered_pairs(group_sizes(components, n, weight)),
                        ordered_pairs(group_sizes(class_ids, n, weight)), majority.sum(), weight.sum()])


def distinct_valid_classes(classes: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Number of distinct classes among the valid labels (int64 scalar on the device)."""
    return (group_sizes(compact(classes), classes.shape[0], valid) > 0).sum()


# ---- the per-step blocks: [2, k] float64 (numerators; denominators) ----

def graph_block(labellings: tuple, nn: tuple) -> torch.Tensor:
    """GRAPH_NAMES of one step. labellings: the weak labels the loss used (inherit: (y1, y2) of the two views;
    knn: (y,) of the image graph of all crops); nn: the two views' 1-NN targets (knn: the image each global
    crop's 1-NN belongs to). The views' partitions are y1, y2 (inherit) or the components of each view's
    1-NN graph alone (knn)."""
    summary = torch.stack([partition_summary(y) for y in labellings]).sum(0)  # components, nodes, max, singletons
    count = torch.full((), float(len(labellings)), dtype=torch.float64, device=summary.device)  # a fill: no copy
    views = labellings if len(labellings) == 2 else tuple(kernels.connected_components(t) for t in nn)
    one = torch.ones_like(count)
    numerators = torch.stack([summary[0], summary[1], summary[2], summary[3], adjusted_rand_index(*views),
                              shared_edges(*nn)])
    denominators = torch.stack([count, summary[0], count, summary[1], one, one])
    return torch.stack([numerators, denominators])


def truth_block(labellings: tuple, classes: torch.Tensor) -> torch.Tensor:
    """TRUTH_NAMES of one step from the gathered class labels [N] (label < 0: none, e.g. STL-10's unlabeled
    images); all zero unless the batch holds at least two classes."""
    valid = classes >= 0
    counts = torch.stack([truth_counts(y, classes, valid) for y in labellings]).sum(0)  # tp, weak, same, major, nodes
    block = torch.stack([torch.stack([counts[0], counts[0], counts[3]]), torch.stack([counts[1], counts[2], counts[4]])])
    return torch.where(distinct_valid_classes(classes, valid) >= 2, block, torch.zeros_like(block))


def embedding_block(embeddings: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """[2, 3]: collapse statistic, positive and negative cosine similarity of one head's L2-normalised
    rows [2b, d] (view 1 rows, then view 2); zeros (nothing counted) for a missing head."""
    if embeddings is None:
        return torch.zeros(2, 3, dtype=torch.float64, device=device)
    x = embeddings.detach().to(torch.float64)
    b, dim = x.shape[0] // 2, x.shape[1]
    collapse = x.std(dim=0).mean() * math.sqrt(dim)
    x1, x2 = x[:b], x[b:2 * b]
    positives = (x1 * x2).sum()
    negatives = (x1.sum(0) * x2.sum(0)).sum() - positives  # sum over i != j of x1_i . x2_j
    numerators = torch.stack([collapse, positives, negatives])
    one = collapse.new_ones(())  # denominators by fills: a tensor built from Python numbers is a synchronising copy
    return torch.stack([numerators, torch.stack([one, one * b, one * (b * (b - 1))])])


def finite(block: torch.Tensor) -> torch.Tensor:
    """The block with every statistic whose numerator or denominator is not finite left out (zeros)."""
    ok = torch.isfinite(block).all(0, keepdim=True)
    return torch.where(ok, block, torch.zeros_like(block))


class Diagnostics:
    """The device-side interval sums of one run (module docstring). `observe(batch, graph)` after each
    training step adds that step; `names` / `sums` [2, E] / `reset()` is what wcl_fast.log.StepMeter reads.
    The embeddings come from a forward hook on the model (the outputs of the training forward: z, u of the
    global crops), so every objective is covered without a change to its code."""

    names = GRAPH_NAMES + TRUTH_NAMES + EMBEDDING_NAMES

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.sums = torch.zeros(2, len(self.names), dtype=torch.float64, device=device)
        self._outputs = None
        self._module = model
        self._hook = model.register_forward_hook(self._capture)

    def _capture(self, module, args, outputs) -> None:
        self._outputs = (outputs[0].detach(), None if outputs[1] is None else outputs[1].detach())

    def remove(self) -> None:
        self._hook.remove()

    def suspend(self) -> None:
        """Takes the forward hook off, as train.diagnostics=false has it (wcl_fast.bench_step times both); resume()
        puts it back."""
        self._hook.remove()
        self._outputs = None

    def resume(self) -> None:
        self._hook = self._module.register_forward_hook(self._capture)

    def reset(self) -> None:
        self.sums.zero_()

    @torch.no_grad()
    def observe(self, batch, graph: dict) -> None:
        """Add one step: the embeddings of the last training forward, and, where the objective exposed its
        weak-label graph (`graph`: 'labels' and 'nn', wcl_fast/objectives/wcl.py), the graph statistics and,
        with the batch's class labels, the weak labels against them. No host read."""
        blocks = []
        g, e = len(GRAPH_NAMES), len(TRUTH_NAMES)
        if graph.get("labels"):
            labellings = graph["labels"]
            blocks.append((0, graph_block(labellings, graph["nn"])))
            if batch.label is not None and batch.label.numel() == batch.index.numel():
                classes = wdist.gather_rows(batch.label.to(labellings[0].device))  # node i = global image row i
                blocks.append((g, truth_block(labellings, classes)))
        outputs, self._outputs = self._outputs, None
        if outputs is not None:
            device = outputs[0].device
            head = torch.cat([embedding_block(outputs[0], device), embedding_block(outputs[1], device)], dim=1)
            blocks.append((g + e, head))
        for start, block in blocks:
            self.sums[:, start:start + block.shape[1]] += finite(block)
