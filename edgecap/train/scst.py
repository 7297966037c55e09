"""Self-critical sequence training (Rennie et al., CVPR 2017) with the baseline of Luo (2020, "A better variant of
self-critical sequence training"): per image, K captions are sampled from the decoder's own step function; each
one's reward is its CIDEr-D against the image's training references, its baseline the mean reward of the image's
other K-1 samples (no greedy pass), and the loss is -(reward - baseline) * log p(word), averaged over the words.

The reward counts the end of a caption as a word (`END`, on the references and on every sample that ended), as
ruotianluo's ImageCaptioning.pytorch does: plain CIDEr-D never sees where a caption stops, so sampling learns to
stop mid-phrase ("a dog runs in the"), while n-grams such as "the END" occur in no reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from edgecap.runtime.search import SearchOptions
from edgecap.runtime.vocab import Vocabulary, tokenize

from .cider import CiderD
from .data import Split
from .model import CaptionModel


@dataclass
class Samples:
    """K sampled captions per image, image-major (rows i*K .. i*K+K-1 are image i's)."""

    tokens: Tensor    # [N, T] word ids up to and including <end>, <pad> after it
    logprobs: Tensor  # [N, T] log-probability of each sampled word, 0 after <end>
    mask: Tensor      # [N, T] 1.0 on the sampled words (<end> included), 0.0 after


def sample_captions(decoder: nn.Module, regions: Tensor, pooled: Tensor, k: int, opts: SearchOptions) -> Samples:
    """K multinomial samples per image of at most `opts.max_length` words (<end> included), drawn from what the
    search may choose: never <pad> or <start>, nor <unk> with `block_unk`, no <end> before `min_length` words."""
    features = {"regions": regions, "pooled": pooled}
    arrays = {**features, **dict(zip(decoder.init_outputs, decoder.init(features[decoder.init_input])))}
    h, c, *context = (arrays[name].repeat_interleave(k, 0) for name in ("h", "c", *decoder.context_names))
    n, device = h.shape[0], h.device
    blocked = torch.zeros(decoder.fc.out_features, dtype=torch.bool, device=device)  # [V]
    blocked[[Vocabulary.pad_id, Vocabulary.start_id] + ([Vocabulary.unk_id] if opts.block_unk else [])] = True
    early = blocked.clone()
    early[Vocabulary.end_id] = True
    word = torch.full((n,), Vocabulary.start_id, dtype=torch.long, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    tokens, logprobs = [], []
    for t in range(opts.max_length):
        scores, h, c, *_ = decoder.step(word, h, c, *context)                                    # [N, V]
        scores = scores.float().masked_fill(early if t < opts.min_length else blocked, -torch.inf).log_softmax(1)
        word = torch.multinomial(scores.detach().exp(), 1).squeeze(1).masked_fill(done, Vocabulary.pad_id)  # [N]
        logprobs.append(scores.gather(1, word[:, None]).squeeze(1).masked_fill(done, 0.0))
        tokens.append(word)
        done = done | (word == Vocabulary.end_id)
        if done.all():
            break
    words = torch.stack(tokens, 1)                                                                # [N, T]
    return Samples(words, torch.stack(logprobs, 1), (words != Vocabulary.pad_id).float())


END = "<end>"  # the end of a caption as a reward word: no tokenized caption can hold it (tokenize drops "<>")


def training_reward(split: Split) -> CiderD:
    """CIDEr-D against each training image's references (keyed by its index) ending in `END`, document
    frequencies over all of them: computed once per run."""
    return CiderD({i: [tokenize(c) + [END] for c in split.captions(i)] for i in range(len(split))})


def mean_of_others(rewards: Tensor) -> Tensor:
    """Rewards [B, K] -> each sample's baseline [B, K]: the mean reward of its image's other K-1 samples."""
    return (rewards.sum(1, keepdim=True) - rewards) / (rewards.shape[1] - 1)


def policy_loss(samples: Samples, advantage: Tensor) -> Tensor:
    """REINFORCE with a baseline: -(reward - baseline) [N] * log p(word), averaged over the sampled words."""
    return -(advantage[:, None] * samples.logprobs * samples.mask).sum() / samples.mask.sum()


class SelfCritical(nn.Module):
    """The self-critical objective as a module (so that DistributedDataParallel can wrap it): images (or cached
    regions) and their indices in the training split -> (loss, batch means of reward and baseline). With the
    mean-of-others baseline the two means are equal by construction; each sample's own baseline is what counts."""

    def __init__(self, model: CaptionModel, cached: bool, reward: CiderD, vocab: Vocabulary, samples: int,
                 opts: SearchOptions):
        super().__init__()
        self.model, self.cached, self.reward, self.vocab = model, cached, reward, vocab
        self.k, self.opts = samples, opts

    def sample(self, x: Tensor) -> Samples:
        """K captions per image of a batch of images (or cached regions) [B, ...]."""
        regions, pooled = (x, self.model.encoder.pool(x)) if self.cached else self.model.encoder(x)
        return sample_captions(self.model.decoder, regions, pooled, self.k, self.opts)

    def rewards(self, index: Tensor, samples: Samples) -> Tensor:
        """CIDEr-D [B, K] of each sample (with `END` when it ended) against the references of its image (`index`
        [B] in the training split)."""
        captions = [self.vocab.decode(row).split() + ([END] if Vocabulary.end_id in row else [])
                    for row in samples.tokens.tolist()]
        scores = self.reward.scores(index.repeat_interleave(self.k).tolist(), captions)
        return torch.tensor(scores, device=samples.tokens.device).view(-1, self.k)

    def forward(self, x: Tensor, index: Tensor) -> tuple[Tensor, dict[str, float]]:
        samples = self.sample(x)
        rewards = self.rewards(index, samples)                                                    # [B, K]
        baseline = mean_of_others(rewards)
        loss = policy_loss(samples, (rewards - baseline).flatten())
        return loss, {"reward": rewards.mean().item(), "baseline": baseline.mean().item()}
