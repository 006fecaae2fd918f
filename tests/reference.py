"""An independent eager AT-EDM block, written from the paper's equations for the tests.

It shares nothing with the package but the diffusers modules: the map is computed with einsum
from the layer's own projections, top-k by a full sort, recovery by explicit loops over tokens.
"""

import torch


def self_attention_map(layer, hidden, reduction="mean"):
    attn = layer.attn1
    normed = layer.norm1(hidden)
    q, k = attn.to_q(normed), attn.to_k(normed)
    batch, tokens, width = q.shape
    heads = attn.heads
    q = q.view(batch, tokens, heads, width // heads)
    k = k.view(batch, tokens, heads, width // heads)
    logits = torch.einsum("bihd,bjhd->bhij", q, k) / (width // heads) ** 0.5
    probs = logits.softmax(-1)
    if reduction == "rms":
        return probs.pow(2).mean(1).sqrt()
    return probs.mean(1)  # [B, N, N], heads averaged


def gwpr(attn, iterations):
    batch, tokens, _ = attn.shape
    s = torch.full((batch, tokens), 1.0 / tokens)
    for _ in range(iterations):
        s = torch.einsum("bi,bij->bj", s, attn)
        s = s / s.sum(-1, keepdim=True)
    return s


def select(scores, k, height, width, cell=1, fill="score", hidden=None):
    """The kept tokens of one image: with cell > 1 the best token of every cell x cell patch
    (found by looping over the patches; the patches grown until there are at most k), best first, then the rest by a full sort of their scores
    (``fill="score"``) or of their highest cosine to a winner, lowest first (``"distinct"``)."""
    order = [int(i) for i in torch.sort(scores, descending=True).indices]
    if cell == 1:
        return torch.tensor(order[:k])
    while cell < max(height, width) and -(-height // cell) * -(-width // cell) > k:
        cell += 1  # more patches than kept tokens: larger patches, until each keeps one
    winners = set()
    for top in range(0, height, cell):
        for left in range(0, width, cell):
            patch = [r * width + c for r in range(top, min(top + cell, height)) for c in range(left, min(left + cell, width))]
            winners.add(max(patch, key=lambda i: float(scores[i])))
    first = [i for i in order if i in winners]
    if fill == "distinct" and k > len(first):
        def redundancy(i):
            return max(float(torch.dot(hidden[i], hidden[w]) / (hidden[i].norm() * hidden[w].norm())) for w in winners)
        rest = sorted((i for i in range(len(scores)) if i not in winners), key=redundancy)
        return torch.tensor(first + rest[:k - len(first)])
    return torch.tensor((first + [i for i in order if i not in winners])[:k])


def first_layer_keys(layer, hidden):
    return layer.attn1.to_k(layer.norm1(hidden))


def pruned_block(block, x, text, keep_ratio, iterations=5, recovery="similarity", similarity="attention",
                 neighbours=1, cell=1, fill="score"):
    """Transformer2DModel forward with AT-EDM (linear projections, after-FF pruning)."""
    batch, channels, height, width = x.shape
    tokens = height * width
    h = block.norm(x).permute(0, 2, 3, 1).reshape(batch, tokens, channels)
    h = block.proj_in(h)
    first = block.transformer_blocks[0]
    attn = self_attention_map(first, h)
    keys = first_layer_keys(first, h)
    h = first(h, encoder_hidden_states=text)
    k = int(keep_ratio * tokens + 0.5)
    scores = gwpr(attn, iterations)
    index = torch.stack([select(scores[b], k, height, width, cell, fill, h[b]) for b in range(batch)])
    kept = torch.stack([h[b, index[b]] for b in range(batch)])
    if recovery == "merge-delta":  # each kept token's place taken by its cluster's mean
        nearest = [[int(torch.argmax(torch.stack([torch.dot(keys[b, i], keys[b, j]) / (keys[b, i].norm() * keys[b, j].norm())
                                                  for j in index[b]]))) for i in range(tokens)] for b in range(batch)]
        for b in range(batch):
            for j in range(k):
                members = [i for i in range(tokens) if nearest[b][i] == j]
                kept[b, j] = torch.stack([h[b, i] for i in members]).mean(0) if members else 0
        means = kept.clone()
    states = [kept]
    for layer in block.transformer_blocks[1:]:
        kept = layer(kept, encoder_hidden_states=text)
        states.append(kept)
    full = torch.zeros_like(h)
    for b in range(batch):
        for i in range(tokens):
            if similarity == "attention":
                to_kept = attn[b, i, index[b]]
            else:
                to_kept = torch.stack([torch.dot(keys[b, i], keys[b, j]) / (keys[b, i].norm() * keys[b, j].norm())
                                       for j in index[b]])
            if recovery == "similarity":
                full[b, i] = kept[b, int(torch.argmax(to_kept))]
            elif recovery == "delta":
                ranked = torch.sort(to_kept, descending=True).indices[:neighbours]
                weights = to_kept[ranked].clamp_min(torch.finfo(to_kept.dtype).tiny)
                weights = weights / weights.sum()
                full[b, i] = h[b, i]
                for w, j in zip(weights, ranked):
                    full[b, i] += w * (kept[b, j] - h[b, index[b, j]])
            elif recovery == "layer-delta":
                value = h[b, i].clone()
                for current, following in zip(states[:-1], states[1:]):
                    cosines = [float(torch.dot(value, c) / (value.norm() * c.norm())) for c in current[b]]
                    j = max(range(len(cosines)), key=cosines.__getitem__)
                    value = value + following[b, j] - current[b, j]
                full[b, i] = value
            elif recovery == "direct-copy":
                full[b, i] = h[b, i]
            elif recovery == "merge-delta":
                j = nearest[b][i]
                full[b, i] = h[b, i] + kept[b, j] - means[b, j]
        if recovery != "merge-delta":  # the kept tokens' own final values (merged: they ran on means)
            full[b, index[b]] = kept[b]
    out = block.proj_out(full).reshape(batch, height, width, -1).permute(0, 3, 1, 2)
    return out + x, index
