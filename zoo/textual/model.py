"""Textual explanations (Hendricks et al., "Generating Visual Explanations", ECCV 2016): building blocks.

Faithful: the generator is the paper's two-layer "factored" LSTM: LSTM1 reads the previous word's embedding,
LSTM2 reads LSTM1's output concatenated with a static feature (image feature, class feature or both, chosen by the
variant) at every step; a linear layer gives the next word. Decoding is batched: greedy, sampling (with the
per-word log-probabilities REINFORCE needs, masked after the end token) and beam search. The sentence classifier
(one LSTM over word embeddings, dropout, linear) supplies the discriminative reward.

`ExplanationModel` puts the generator over a registered image backbone with the paper's five variants, each a
registered model (`textual_definition`, `textual_description`, `textual_explanation_label`, `textual_explanation_dis`,
`textual_explanation`; the sentence classifier is `textual_sentence_classifier`); the class feature is a learnt
label embedding (the PyTorch port) or, as in the paper, each class's mean description-model state
(`class_features="description"`, filled by `zoo.textual.system.TextualSystem` from a description checkpoint).
Departure: sizes default to CPU-sized worlds (paper 1000-d): image feature 128 (`feature_dim`), class feature 64
(`class_dim`), word embedding 128 (`embed_dim`), LSTM hidden 256 (`hidden`); the sentence classifier's 128 / 256.
`TextualSystem` takes them as `hidden` and `model_kwargs` / `sentence_classifier_kwargs`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.checks import check_input
from zoo.layers import LSTM
from zoo.registry import create_model_for_data, input_size_aware, register_model


class FactoredLSTMGenerator(nn.Module):
    """p(w_t | w_<t, feature) with the two-layer factored LSTM; token ids with `pad`, `bos` and `eos` ids."""

    def __init__(self, vocab_size: int, feature_dim: int, *, embed_dim: int = 128, hidden: int = 256,
                 max_len: int = 20, pad: int = 0, bos: int = 1, eos: int = 2) -> None:
        super().__init__()
        self.vocab_size, self.max_len, self.pad, self.bos, self.eos = vocab_size, max_len, pad, bos, eos
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=pad)
        self.word_lstm = LSTM(embed_dim, hidden, batch_first=True)
        self.feature_lstm = LSTM(hidden + feature_dim, hidden, batch_first=True)
        self.out = nn.Linear(hidden, vocab_size)
        for p in self.parameters():  # the paper's uniform +-0.08 initialisation
            nn.init.uniform_(p, -0.08, 0.08)
        never = torch.zeros(vocab_size).index_fill_(0, torch.tensor([pad, bos]), float("-inf"))
        self.register_buffer("never_generated", never, persistent=False)  # (V,) added to every step's logits

    def forward(self, feature: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: logits (B, L-1, V) for tokens[:, 1:] given tokens[:, :-1] and the feature (B, F)."""
        return self.out(self.hidden_states(feature, tokens))

    def hidden_states(self, feature: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """LSTM2's states (B, L-1, H) under teacher forcing: state t has read tokens[:, :t+1]."""
        words, _ = self.word_lstm(self.embed(tokens[:, :-1]))  # (B, L-1, H)
        static = feature[:, None].expand(-1, words.shape[1], -1)  # (B, L-1, F)
        hidden, _ = self.feature_lstm(torch.cat([words, static], -1))
        return hidden

    def step(self, feature: torch.Tensor, token: torch.Tensor, state: tuple | None) -> tuple[torch.Tensor, tuple]:
        """One decoding step: next-word log-probabilities (B, V) and the new state ((h, c) of each LSTM, (B, H))."""
        logits, state = self._step_logits(feature, token, state, self._out_bias())
        return F.log_softmax(logits, -1), state

    def _out_bias(self) -> torch.Tensor:
        """The output layer's bias with -inf at padding and the start token (V,): they are never generated."""
        return self.out.bias + self.never_generated

    def _step_logits(self, feature: torch.Tensor, token: torch.Tensor, state: tuple | None, out_bias: torch.Tensor
                     ) -> tuple[torch.Tensor, tuple]:
        """One decoding step's float32 logits (B, V) (`out_bias`: `_out_bias()`, built once per sentence) and the
        new state.

        Each LSTM advances by one `torch.lstm_cell` on its own weights, the op `nn.LSTMCell` runs: on a GPU two
        matmuls and one fused kernel, where a one-step `nn.LSTM` call costs more launches (and on the CPU it is
        faster too). The same function as the sequence LSTMs of teacher forcing up to float rounding
        (tests/test_textual.py compares them)."""
        if state is None:
            zeros = feature.new_zeros(len(feature), self.word_lstm.hidden_size, dtype=self.out.weight.dtype)
            state = ((zeros, zeros), (zeros, zeros))
        word_state = _lstm_cell(self.word_lstm, self.embed(token), state[0])  # (B, H) each
        feature_state = _lstm_cell(self.feature_lstm, torch.cat([word_state[0], feature], -1), state[1])
        return F.linear(feature_state[0], self.out.weight, out_bias).float(), (word_state, feature_state)

    def decode(self, feature: torch.Tensor, mode: str = "greedy", beam_size: int = 3, early_stop: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sentences (B, max_len) without <bos>, padded after <eos>, and each word's log-probability (B, max_len),
        0 after <eos>. `mode`: greedy | sample | beam (the log-probabilities of a beam are its words' too).
        `early_stop`: greedy and sampled decoding stop once every sentence has ended (one device read per word);
        False runs all max_len steps without reading the device (the same sentences; sampling draws more noise)."""
        if mode == "beam":
            return self._beam(feature, beam_size)
        if mode not in ("greedy", "sample"):
            raise ValueError(f"mode must be greedy, sample or beam; got {mode!r}.")
        if mode == "sample" and torch.is_grad_enabled():
            # REINFORCE differentiates the sampled words' log-probabilities. Draw the words without a graph, then
            # score them in one teacher-forced pass: one backward through two sequence LSTMs instead of one per
            # word. The same words and, up to float rounding, the same log-probabilities and gradients.
            with torch.no_grad():
                sentences, _ = self._decode_loop(feature, mode, early_stop, scored=False)
            return sentences, self.word_log_probs(feature, sentences)
        return self._decode_loop(feature, mode, early_stop)

    def word_log_probs(self, feature: torch.Tensor, sentences: torch.Tensor) -> torch.Tensor:
        """log p(w_t | w_<t, feature) of each word of `sentences` (B, T) (no <bos>, <pad> after <eos>), 0 after each
        sentence's <eos>, as `decode` gives them for the sentences it generates: (B, T)."""
        return self._scored(self(feature, self._with_bos(sentences)), sentences)

    def forward_and_sample(self, feature: torch.Tensor, tokens: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Teacher forcing on `tokens` (B, L) as `forward` does, and REINFORCE's sentences: drawn from the same
        features as `decode(mode="sample", early_stop=False)` draws them, with the per-word log-probabilities
        `word_log_probs` gives. One pass of the sequence LSTMs scores both sets of B sentences (and one backward
        runs through it), where two passes would launch everything twice.

        Returns word_logits (B, L-1, V), samples (B, max_len), sample_log_probs (B, max_len)."""
        batch, length = len(tokens), max(tokens.shape[1], self.max_len + 1)
        with torch.no_grad():
            samples, _ = self._decode_loop(feature, "sample", early_stop=False, scored=False)
        both = torch.cat([F.pad(tokens, (0, length - tokens.shape[1]), value=self.pad),
                          F.pad(self._with_bos(samples), (0, length - self.max_len - 1), value=self.pad)])
        logits = self(feature.repeat(2, 1), both)  # (2B, length - 1, V); causal, so the padding changes nothing
        return (logits[:batch, :tokens.shape[1] - 1], samples,
                self._scored(logits[batch:, :self.max_len], samples))

    def _with_bos(self, sentences: torch.Tensor) -> torch.Tensor:
        """(B, T + 1): <bos> before each sentence."""
        return torch.cat([sentences.new_full((len(sentences), 1), self.bos), sentences], 1)

    def _scored(self, logits: torch.Tensor, sentences: torch.Tensor) -> torch.Tensor:
        """log-probabilities (B, T) of the words `sentences` (B, T) under teacher-forced `logits` (B, T, V), 0 after
        each sentence's first <eos>."""
        log_probs = F.log_softmax(logits.float() + self.never_generated, -1)  # (B, T, V)
        return log_probs.gather(2, sentences[..., None])[..., 0].masked_fill(self._after_end(sentences), 0.0)

    def _after_end(self, sentences: torch.Tensor) -> torch.Tensor:
        """(B, T) bool: the positions after each sentence's first <eos>."""
        is_eos = (sentences == self.eos).long()
        return is_eos.cumsum(1) - is_eos > 0

    def _decode_loop(self, feature: torch.Tensor, mode: str, early_stop: bool, scored: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Greedy or sampled decoding, one batched step per word (`decode`); `scored=False` keeps no per-word
        log-probabilities (None in their place).

        Without `early_stop` the loop keeps no per-sentence state: every sentence runs all max_len steps and what
        follows its first <eos> is masked once at the end. The same sentences, as the words a sentence draws after
        its end never reach the words before it, and each step draws the same noise either way."""
        batch = len(feature)
        token = torch.full((batch,), self.bos, dtype=torch.long, device=feature.device)
        done = torch.zeros(batch, dtype=torch.bool, device=feature.device)
        out_bias = self._out_bias()
        tokens, log_probs, state = [], [], None
        for _ in range(self.max_len):  # a loop over time steps, batched over sentences
            logits, state = self._step_logits(feature, token, state, out_bias)  # (B, V)
            token = _multinomial_draw(logits.softmax(-1)) if mode == "sample" else logits.argmax(-1)
            if early_stop:
                token = token.masked_fill(done, self.pad)
                done = done | (token == self.eos)
            if scored:
                log_probs.append(F.log_softmax(logits, -1).gather(1, token[:, None])[:, 0])
            tokens.append(token)
            if early_stop and done.all():  # reads the device: training's sampling runs to max_len instead
                break
        tokens_t = torch.stack(tokens, 1)  # (B, steps)
        ended = self._after_end(tokens_t)
        width = self.max_len - tokens_t.shape[1]
        return (F.pad(tokens_t.masked_fill(ended, self.pad), (0, width), value=self.pad),
                F.pad(torch.stack(log_probs, 1).masked_fill(ended, 0.0), (0, width)) if scored else None)

    def _beam(self, feature: torch.Tensor, beam_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batched beam search: B x K hypotheses advance together; finished ones only extend with padding."""
        batch, k, device = len(feature), beam_size, feature.device
        feature = feature.repeat_interleave(k, 0)  # (B*K, F)
        token = torch.full((batch * k,), self.bos, dtype=torch.long, device=device)
        score = torch.full((batch, k), float("-inf"), device=device)
        score[:, 0] = 0.0  # all beams start identical: keep one
        done = torch.zeros(batch * k, dtype=torch.bool, device=device)
        tokens = torch.zeros(batch * k, 0, dtype=torch.long, device=device)
        word_log_probs = torch.zeros(batch * k, 0, device=device)
        state, out_bias = None, self._out_bias()
        for _ in range(self.max_len):
            logits, state = self._step_logits(feature, token, state, out_bias)
            step_log_probs = F.log_softmax(logits, -1)  # (B*K, V)
            finished = torch.full_like(step_log_probs, float("-inf"))
            finished[:, self.pad] = 0.0  # a finished hypothesis keeps its score and emits padding
            step_log_probs = torch.where(done[:, None], finished, step_log_probs)
            total = (score.reshape(-1, 1) + step_log_probs).reshape(batch, k * self.vocab_size)
            score, flat = total.topk(k, -1)  # (B, K)
            parent = (flat // self.vocab_size + torch.arange(batch, device=device)[:, None] * k).reshape(-1)
            token = (flat % self.vocab_size).reshape(-1)
            chosen = step_log_probs[parent, token]
            tokens = torch.cat([tokens[parent], token[:, None]], 1)
            word_log_probs = torch.cat([word_log_probs[parent], chosen[:, None]], 1)
            state = tuple((h[parent], c[parent]) for h, c in state)
            done = done[parent] | (token == self.eos) | (token == self.pad)
            if done.all():
                break
        best = score.argmax(-1) + torch.arange(batch, device=device) * k  # (B,)
        width = self.max_len - tokens.shape[1]
        return (F.pad(tokens[best], (0, width), value=self.pad),
                F.pad(word_log_probs[best].masked_fill(tokens[best] == self.pad, 0.0), (0, width)))


def _lstm_cell(lstm: LSTM, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One time step (h, c) (B, H) of the one-layer `lstm` on inputs x (B, input_size)."""
    return torch.lstm_cell(x, state, lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0, lstm.bias_hh_l0)


def _multinomial_draw(probs: torch.Tensor) -> torch.Tensor:
    """One index per row (B,) drawn from `probs` (B, V) as `torch.multinomial(probs, 1)` draws it (the same
    exponential noise, so the same index from the same random state), without its input checks: five fewer kernels
    per decoded word, and the rows here are softmax outputs."""
    return probs.div(torch.empty_like(probs).exponential_()).argmax(-1)


class SentenceClassifier(nn.Module):
    """Class of a sentence (B, L) of token ids: embedding, one LSTM, dropout (the paper's 0.75), linear on the state
    at each sentence's last word. The discriminative reward is its probability of the true class."""

    def __init__(self, vocab_size: int, num_classes: int, *, embed_dim: int = 128, hidden: int = 256,
                 dropout: float = 0.75, pad: int = 0) -> None:
        super().__init__()
        self.pad, self.num_classes = pad, num_classes
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=pad)
        self.lstm = LSTM(embed_dim, hidden, batch_first=True)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, num_classes)

    @property
    def num_features(self) -> int:
        """timm's `num_features`: the width the classifier (`head`) reads, the LSTM's hidden size."""
        return self.head.in_features

    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        check_input("SentenceClassifier", tokens, ("B", "L"), "token ids", kind="long",
                    ids_below=self.embed.num_embeddings)
        states, _ = self.lstm(self.embed(tokens))  # (B, L, H)
        last = ((tokens != self.pad).sum(1) - 1).clamp(min=0)  # (B,) position of each sentence's last word
        features = states[torch.arange(len(tokens), device=tokens.device), last]
        return {"logits": self.head(self.drop(features)), "features": features}

    @torch.no_grad()
    def true_class_probability(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B,) probability of each sentence's true class: the discriminative reward."""
        return self(tokens)["logits"].float().softmax(-1).gather(1, labels[:, None])[:, 0]


VARIANTS = {  # variant -> (uses the image, uses the class)
    "definition": (False, True),
    "description": (True, False),
    "explanation-label": (True, True),
    "explanation-dis": (True, False),
    "explanation": (True, True),
}


CLASS_FEATURES = ("embedding", "description")


class ExplanationModel(nn.Module):
    """Image and/or class features -> FactoredLSTMGenerator, per the paper's five variants (`VARIANTS`).

    The image feature is the pooled top map of a registered classifier (`image_encoder`, e.g. a trained
    baseline_tinycnn; frozen unless `train_encoder`), projected to `feature_dim`. The class feature is
    `class_features="embedding"`: a learnt label embedding of `class_dim` (the PyTorch port's choice), or
    `"description"`: the fixed `class_table[label]` (C, `class_dim`), each class's mean description-model state
    (the paper's class embedding; `class_dim` is then the description model's hidden size, and the table is
    filled before training, `class_table_ready` saying so). `embed_dim` and `hidden`: the generator's word
    embedding and LSTM sizes (`FactoredLSTMGenerator`). `vocabulary`: the words of the token ids (the data's,
    recorded by `TextualSystem` and kept in a checkpoint's and an export's `model_kwargs`), None where unknown.
    """

    def __init__(self, image_encoder: nn.Module, image_dim: int, num_classes: int, vocab_size: int, *,
                 variant: str = "explanation", feature_dim: int = 128, class_dim: int = 64, embed_dim: int = 128,
                 hidden: int = 256, max_len: int = 20, train_encoder: bool = False, class_features: str = "embedding",
                 vocabulary: list[str] | None = None) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {list(VARIANTS)}; got {variant!r}.")
        if class_features not in CLASS_FEATURES:
            raise ValueError(f"class_features must be one of {CLASS_FEATURES}; got {class_features!r}.")
        self.variant, self.class_features = variant, class_features
        self.num_classes, self.vocab_size = num_classes, vocab_size
        self.vocabulary = list(vocabulary) if vocabulary is not None else None  # token id -> word, where known
        self.uses_image, self.uses_class = VARIANTS[variant]
        self.image_encoder = image_encoder.requires_grad_(train_encoder)
        self.train_encoder = train_encoder
        self.image_proj = nn.Linear(image_dim, feature_dim)
        if class_features == "embedding":
            self.class_embed = nn.Embedding(num_classes, class_dim)
        else:
            self.register_buffer("class_table", torch.zeros(num_classes, class_dim))
            self.register_buffer("class_table_ready", torch.tensor(False))
        static = feature_dim * self.uses_image + class_dim * self.uses_class
        self.generator = FactoredLSTMGenerator(vocab_size, static, embed_dim=embed_dim, hidden=hidden,
                                               max_len=max_len)
        self.freeze_unread()

    def unread_modules(self) -> list[nn.Module]:
        """The submodules whose parameters the variant's features (hence its loss, with or without the discriminative
        term) never read: without the image, the image encoder and its projection (`definition`); without the class,
        the label embedding (`description`, `explanation-dis`); with `train_encoder`, the encoder's classifier head
        (the pooled `forward_features` are read). Every variant builds them all so that all have the
        same state_dict keys: a stage-2 variant loads a stage-1 checkpoint of another one
        (`TextualSystem._load_stage`), and older checkpoints still load."""
        unread: list[nn.Module] = []
        if not self.uses_image:
            unread += [self.image_encoder, self.image_proj]
        if not self.uses_class and self.class_features == "embedding":
            unread.append(self.class_embed)
        head = getattr(self.image_encoder, "head", None)  # the encoder's classifier: features are read before it
        if self.uses_image and self.train_encoder and isinstance(head, nn.Module):
            unread.append(head)
        return unread

    def freeze_unread(self) -> None:
        """requires_grad off for `unread_modules`. A trainable parameter that the loss never reaches gets no
        gradient, which stops DDP at its first step ("parameters that were not used in producing the loss") and sits
        in the optimiser for nothing. Called at the end of `__init__`, so frozen is the as-built state, the one the
        engine's stages restore (`zoo.engine.stages.Schedule`). Loading weights keeps requires_grad as built: a
        stage-2 variant trains what it reads whatever its stage-1 checkpoint froze (a stage keeps the image/class
        inputs of the one it starts from, so explanation-label -> explanation trains the class embedding both read,
        description -> explanation-dis keeps it frozen)."""
        for module in self.unread_modules():
            module.requires_grad_(False)

    def features(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        parts = []
        if self.uses_image:
            with torch.set_grad_enabled(self.train_encoder and torch.is_grad_enabled()):
                pooled = self.image_encoder.forward_features(images).mean((-2, -1))  # (B, C)
            parts.append(torch.relu(self.image_proj(pooled)))
        if self.uses_class:
            parts.append(self.class_embed(labels) if self.class_features == "embedding" else self.class_table[labels])
        return torch.cat(parts, -1)  # (B, static)

    def forward(self, images: torch.Tensor, labels: torch.Tensor, tokens: torch.Tensor, sample: bool = False
                ) -> dict[str, torch.Tensor]:
        """Teacher forcing on sentences `tokens` (B, L) for images (B, C, H, W) of classes `labels` (B,):
        {"word_logits": (B, L-1, V)}. `sample`: also REINFORCE's sampled sentences from the same features,
        "samples" (B, max_len), and their per-word log-probabilities "sample_log_probs" (B, max_len), 0 after <eos>
        (`FactoredLSTMGenerator.forward_and_sample`: the image is encoded once, both sets scored in one pass)."""
        name = f"ExplanationModel({self.variant})"
        check_input(name, images, ("B", "C", "H", "W"), "images", like=self)
        check_input(name, labels, (len(images),), "labels", kind="long", ids_below=self.num_classes)
        check_input(name, tokens, (len(images), "L"), "token ids", kind="long", ids_below=self.vocab_size)
        feature = self.features(images, labels)  # (B, static)
        if not sample:
            return {"word_logits": self.generator(feature, tokens)}
        word_logits, samples, log_probs = self.generator.forward_and_sample(feature, tokens)
        return {"word_logits": word_logits, "samples": samples, "sample_log_probs": log_probs}

    def explain(self, images: torch.Tensor, labels: torch.Tensor, mode: str = "greedy", beam_size: int = 3,
                early_stop: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Generated sentences (B, max_len) and their per-word log-probabilities (`decode`'s `early_stop`)."""
        name = f"ExplanationModel({self.variant})"
        # the images first, as `forward` does: the labels' expected shape is (B,) of the images' batch, and an image
        # without its batch dimension made the message ask for labels of its channel count
        check_input(name, images, ("B", "C", "H", "W"), "images", like=self)
        check_input(name, labels, (len(images),), "labels", kind="long", ids_below=self.num_classes)
        return self.generator.decode(self.features(images, labels), mode=mode, beam_size=beam_size,
                                     early_stop=early_stop)


def _create_textual(variant: str, *, num_classes: int = 6, vocab_size: int = 25, in_chans: int | None = 3,
                    image_size: int | None = None, encoder: str = "baseline_tinycnn",
                    encoder_kwargs: dict[str, Any] | None = None, **kwargs) -> ExplanationModel:
    """An `ExplanationModel` of `variant` over a registered image classifier `encoder` (its pooled top map is the
    image feature; `image_size` reaches it only if it is built for one input size), created with `encoder_kwargs`
    (`{pretrained_path: resnet18.pth}` starts it from ImageNet weights, `{backbone: ...}` for baseline_timm)."""
    image_encoder = create_model_for_data(encoder, num_classes, in_chans, image_size, None, encoder_kwargs)
    image_dim = getattr(getattr(image_encoder, "backbone", None), "num_features", None)
    if image_dim is None:
        raise ValueError(f"encoder {encoder!r} has no backbone.num_features; use a backbone classifier such as "
                         f"baseline_tinycnn or baseline_resnet18.")
    return ExplanationModel(image_encoder, image_dim, num_classes, vocab_size, variant=variant, **kwargs)


@register_model
@input_size_aware
def textual_definition(**kwargs) -> ExplanationModel:
    """Hendricks et al. 2016, definition: a sentence from the class alone (no image), cross-entropy."""
    return _create_textual("definition", **kwargs)


@register_model
@input_size_aware
def textual_description(**kwargs) -> ExplanationModel:
    """Hendricks et al. 2016, description: a caption from the image alone, cross-entropy."""
    return _create_textual("description", **kwargs)


@register_model
@input_size_aware
def textual_explanation_label(**kwargs) -> ExplanationModel:
    """Hendricks et al. 2016, explanation-label: a sentence from image + class, cross-entropy."""
    return _create_textual("explanation-label", **kwargs)


@register_model
@input_size_aware
def textual_explanation_dis(**kwargs) -> ExplanationModel:
    """Hendricks et al. 2016, explanation-dis: image only, cross-entropy + discriminative (from description)."""
    return _create_textual("explanation-dis", **kwargs)


@register_model
@input_size_aware
def textual_explanation(**kwargs) -> ExplanationModel:
    """Hendricks et al. 2016, explanation: image + class, cross-entropy + discriminative (from explanation-label)."""
    return _create_textual("explanation", **kwargs)


@register_model
def textual_sentence_classifier(num_classes: int = 6, vocab_size: int = 25, **kwargs) -> SentenceClassifier:
    """Hendricks et al. 2016, the sentence classifier whose true-class probability is the discriminative reward."""
    return SentenceClassifier(vocab_size, num_classes, **kwargs)


def variant_model_name(variant: str) -> str:
    """The registry name of a variant's model: "explanation-label" -> "textual_explanation_label"."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {list(VARIANTS)}; got {variant!r}.")
    return "textual_" + variant.replace("-", "_")
