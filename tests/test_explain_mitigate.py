"""Explanation gradients against finite differences; mitigation lowers the gap and keeps BOS."""
import dataclasses

import pytest
import torch

from memoguard.standalone.diffusers_model import load_model
from memoguard.explain import token_contributions
from memoguard.mitigate import minimize_embedding
from memoguard.sampling import initial_noise
from memoguard.score import raw_step_score, step_score


def _setup(model, prompts, seeds):
    cond, uncond = model.encode(prompts), model.encode([""])
    x = initial_noise(model, model.latent_shape(), seeds, model.device)
    return cond, uncond, x


def test_token_scores_match_finite_differences(random_model, random_model_dir):
    cond, uncond, x = _setup(random_model, ["a large red circle on the left"], [3])
    (contrib,) = token_contributions(random_model, cond, uncond, x, steps=1, total_steps=50, method="gradient_norm")
    assert contrib.method_name == "gradient norm (paper)"
    model64 = load_model(random_model_dir, dtype=torch.float64)  # finite differences need double precision
    t = model64.timesteps(50)[0]
    cond64, uncond64 = model64.encode(["a large red circle on the left"]), model64.encode([""])
    x64 = x.double()

    def gap(e):
        eps_c, eps_u = model64.eps_pair(x64, t, cond64, uncond64, e)
        return raw_step_score(eps_c - eps_u).sum()

    e = cond64.embedding.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(gap(e), [e])
    for pos, score in zip(contrib.positions, contrib.scores):
        # the directional derivative along the gradient's own direction is its norm
        direction = g[0, pos] / g[0, pos].norm()
        h = 1e-5
        plus, minus = cond64.embedding.clone(), cond64.embedding.clone()
        plus[0, pos] += h * direction
        minus[0, pos] -= h * direction
        fd = ((gap(plus) - gap(minus)) / (2 * h)).item()
        assert fd == pytest.approx(score, rel=1e-3)


def test_contributions_cover_prompt_tokens_only(random_model):
    cond, uncond, x = _setup(random_model, ["a blue ring , glacier anthem"], [0, 1])
    (contrib,) = token_contributions(random_model, cond, uncond, x[:1].repeat(1, 1, 1, 1))
    assert contrib.tokens == ["a", "blue", "ring", ",", "glacier", "anthem"]
    assert sum(contrib.shares) == pytest.approx(1.0)
    assert 0 not in contrib.positions  # BOS never shown


def test_multi_step_explanation_averages_over_steps(random_model):
    cond, uncond, x = _setup(random_model, ["a small green cross"], [5])
    one = token_contributions(random_model, cond, uncond, x, steps=1, total_steps=10)[0]
    three = token_contributions(random_model, cond, uncond, x, steps=3, total_steps=10)[0]
    assert one.tokens == three.tokens and one.scores != three.scores
    with pytest.raises(ValueError, match="steps must be"):
        token_contributions(random_model, cond, uncond, x, steps=11, total_steps=10)


def test_mitigation_lowers_gap_freezes_bos_and_holds_finished_images(tiny_model):
    from memoguard.tiny.data import build_dataset
    ds = build_dataset(0)
    prompts = [ds.memorized_captions[0], ds.memorized_captions[1]]
    cond, uncond, x = _setup(tiny_model, prompts, [0, 1])
    t = tiny_model.timesteps(20)[0]
    emb, rec = minimize_embedding(tiny_model, cond, uncond, x, t, target=0.0, max_iters=5)
    assert rec.ran and rec.iterations == 5 and rec.image_iterations == [5, 5]
    assert all(a < 0.8 * b for a, b in zip(rec.after, rec.before))
    bos = cond.frozen_mask
    assert torch.equal(emb[bos], cond.embedding[bos])
    assert not torch.equal(emb[~bos], cond.embedding[~bos])
    # a target between the two images' gaps: the lower one never moves
    lo = min(range(2), key=lambda i: rec.before[i])
    emb2, rec2 = minimize_embedding(tiny_model, cond, uncond, x, t, target=rec.before[lo] + 1e-6, max_iters=3)
    assert rec2.image_iterations[lo] == 0 and torch.equal(emb2[lo], cond.embedding[lo])


def test_mitigation_modes(random_model):
    cond, uncond, x = _setup(random_model, ["a red circle"], [0])
    t = random_model.timesteps(20)[0]
    emb, rec = minimize_embedding(random_model, cond, uncond, x, t, mode="off")
    assert not rec.ran and torch.equal(emb, cond.embedding)
    emb, rec = minimize_embedding(random_model, cond, uncond, x, t, mode="auto", threshold=1e9)
    assert not rec.ran and "under threshold" in rec.reason and torch.equal(emb, cond.embedding)
    with pytest.raises(ValueError, match="needs a threshold"):
        minimize_embedding(random_model, cond, uncond, x, t, mode="auto")
    with pytest.raises(ValueError, match="mode must be one of"):
        minimize_embedding(random_model, cond, uncond, x, t, mode="sometimes")
    emb, rec = minimize_embedding(random_model, cond, uncond, x, t, mode="auto", threshold=0.0, target=1e9)
    assert not rec.ran and "under target" in rec.reason and torch.equal(emb, cond.embedding)


def _gap64(model64, x64, t, cond64, uncond64):
    def gap(e, cond=cond64):
        eps_c, eps_u = model64.eps_pair(x64, t, cond, uncond64, e)
        return raw_step_score(eps_c - eps_u).sum()
    return gap


@pytest.fixture(scope="module")
def double(random_model_dir):
    return load_model(random_model_dir, dtype=torch.float64)  # references need double precision


PROMPT = "a large red circle on the left"


def test_gradient_x_input_is_the_derivative_along_the_emptied_position(random_model, double):
    cond, uncond, x = _setup(random_model, [PROMPT], [3])
    (contrib,) = token_contributions(random_model, cond, uncond, x, total_steps=50, method="gradient_x_delta")
    t = double.timesteps(50)[0]
    cond64, uncond64 = double.encode([PROMPT]), double.encode([""])
    gap = _gap64(double, x.double(), t, cond64, uncond64)
    for pos, score in zip(contrib.positions, contrib.scores):
        delta = cond64.embedding[0, pos] - uncond64.embedding[0, pos]
        h = 1e-5
        plus, minus = cond64.embedding.clone(), cond64.embedding.clone()
        plus[0, pos] += h * delta
        minus[0, pos] -= h * delta
        assert ((gap(plus) - gap(minus)) / (2 * h)).item() == pytest.approx(score, rel=1e-3, abs=1e-6)


def test_integrated_gradients_match_a_finite_difference_path_integral(random_model, double):
    cond, uncond, x = _setup(random_model, [PROMPT], [3])
    (contrib,) = token_contributions(random_model, cond, uncond, x, total_steps=50, method="integrated_gradients",
                                     ig_steps=3)
    t = double.timesteps(50)[0]
    cond64, uncond64 = double.encode([PROMPT]), double.encode([""])
    gap = _gap64(double, x.double(), t, cond64, uncond64)
    e, e0 = cond64.embedding, uncond64.embedding
    for pos, score in list(zip(contrib.positions, contrib.scores))[:3]:
        delta, total, h = e[0, pos] - e0[0, pos], 0.0, 1e-5
        for k in range(3):  # the same midpoints, each derivative along delta by finite differences
            point = e0 + (k + 0.5) / 3 * (e - e0)
            plus, minus = point.clone(), point.clone()
            plus[0, pos] += h * delta
            minus[0, pos] -= h * delta
            total += ((gap(plus) - gap(minus)) / (2 * h)).item() / 3
        assert total == pytest.approx(score, rel=1e-3, abs=1e-6)


def test_leave_one_out_re_encodes_the_prompt_without_each_token(random_model):
    cond, uncond, x = _setup(random_model, [PROMPT], [3, 4])
    (contrib,) = token_contributions(random_model, cond, uncond, x, total_steps=50, method="leave_one_out")
    assert contrib.method == "leave_one_out" and contrib.tokens == PROMPT.split()
    t = random_model.timesteps(50)[0]
    words = PROMPT.split()

    def gap(text):
        c = random_model.encode([text]).repeat_rows(2)
        eps_c, eps_u = random_model.eps_pair(x, t, c, uncond)
        return raw_step_score(eps_c - eps_u).mean().item()

    for k, score in enumerate(contrib.scores):  # brute force: each word removed from the text
        assert gap(PROMPT) - gap(" ".join(words[:k] + words[k + 1:])) == pytest.approx(score, rel=1e-4, abs=1e-6)


def test_leave_one_out_in_the_embedding_empties_one_position(random_model):
    cond, uncond, x = _setup(random_model, [PROMPT], [3])
    (contrib,) = token_contributions(random_model, cond, uncond, x, total_steps=50, method="leave_one_out_embedding",
                                     batch_size=2)
    assert contrib.method_name == "leave-one-out (embedding)"
    t = random_model.timesteps(50)[0]
    base = raw_step_score(torch.sub(*random_model.eps_pair(x, t, cond, uncond))).item()
    for pos, score in zip(contrib.positions, contrib.scores):
        emb = cond.embedding.clone()
        emb[0, pos] = uncond.embedding[0, pos]
        after = raw_step_score(torch.sub(*random_model.eps_pair(x, t, cond, uncond, emb))).item()
        assert base - after == pytest.approx(score, rel=1e-4, abs=1e-6)


def test_default_method_is_exact_leave_one_out_for_short_prompts_and_screened_for_long_ones(random_model):
    from memoguard.explain import LEAVE_ONE_OUT_MAX_WORDS, default_method
    short = random_model.encode([PROMPT])
    long = random_model.encode([" ".join(["red"] * (LEAVE_ONE_OUT_MAX_WORDS + 1))])
    assert default_method(random_model, short) == "leave_one_out"
    assert default_method(random_model, long) == "leave_one_out_screened"
    no_ids = short.with_embedding(short.embedding)
    no_ids.ids = None  # what an adapter that cannot re-encode hands over
    assert default_method(random_model, no_ids) == "gradient_x_delta"
    cond, uncond, x = _setup(random_model, [PROMPT], [0])
    (c,) = token_contributions(random_model, no_ids, uncond, x, total_steps=10, method="leave_one_out")
    assert c.method == "leave_one_out_embedding"  # named for what it did
    with pytest.raises(ValueError, match="explanation method must be one of"):
        token_contributions(random_model, cond, uncond, x, method="saliency")
    for method in ("leave_one_out_screened", "leave_one_out_grouped"):
        with pytest.raises(ValueError, match="re-encodes the prompt"):
            token_contributions(random_model, no_ids, uncond, x, total_steps=10, method=method)


def test_a_word_is_its_pieces_together_and_leave_one_out_removes_it_whole(random_model):
    text = "a quixotically red circle"  # "quixotically" is three BPE pieces
    cond, uncond, x = _setup(random_model, [text], [3])
    assert len(cond.prompt_tokens(0)) > 4
    for method in ("leave_one_out", "gradient_x_delta", "gradient_norm"):
        (c,) = token_contributions(random_model, cond, uncond, x, total_steps=50, method=method)
        assert c.tokens == text.split() and [len(g) for g in c.groups] == [1, len(cond.prompt_tokens(0)) - 3, 1, 1]
    (word,) = token_contributions(random_model, cond, uncond, x, total_steps=50, method="gradient_x_delta")
    (piece_by_piece,) = token_contributions(random_model, dataclasses.replace(cond, words=None), uncond, x,
                                            total_steps=50, method="gradient_x_delta")  # no word marks: one token each
    assert word.scores[1] == pytest.approx(sum(piece_by_piece.scores[1:-2]), rel=1e-5)
    (loo,) = token_contributions(random_model, cond, uncond, x, total_steps=50, method="leave_one_out")
    t = random_model.timesteps(50)[0]
    gap = lambda txt: raw_step_score(torch.sub(*random_model.eps_pair(x, t, random_model.encode([txt]), uncond))).item()
    assert gap(text) - gap("a red circle") == pytest.approx(loo.scores[1], rel=1e-4, abs=1e-6)
    # the score with a word left out, as the spread message reads it (RMS of the same difference)
    assert loo.score_without(1) == pytest.approx(gap("a red circle") / x[0].numel() ** 0.5, rel=1e-4)


def assert_measures_only(contributions, words, exact):
    """`words` measured as exact leave-one-out measures them, the others not at all."""
    assert [i for i, m in enumerate(contributions.measured) if m] == words
    for i in range(len(contributions.tokens)):
        if i in words:
            assert contributions.scores[i] == pytest.approx(exact.scores[i], rel=1e-4, abs=1e-6)
        else:
            assert contributions.scores[i] == 0.0 and contributions.score_without(i) is None


def test_grouped_leave_one_out_narrows_to_the_part_whose_removal_matters_most(random_model):
    """Brute force on the text: each round leaves out each quarter of the words in play and keeps the quarter
    whose removal lowers the gap most; the last words are each left out alone, exactly as leave-one-out does."""
    from memoguard.explain import GROUPED_WORDS, GROUPS
    words = "a large red circle on the left next to a small blue square at the top of the grey picture".split()
    cond, uncond, x = _setup(random_model, [" ".join(words)], [3])
    (grouped,) = token_contributions(random_model, cond, uncond, x, total_steps=50, method="leave_one_out_grouped")
    (exact,) = token_contributions(random_model, cond, uncond, x, total_steps=50, method="leave_one_out")
    t = random_model.timesteps(50)[0]
    gap = lambda keep: raw_step_score(torch.sub(*random_model.eps_pair(
        x, t, random_model.encode([" ".join(words[i] for i in keep)]), uncond))).item()
    left = list(range(len(words)))
    while len(left) > GROUPED_WORDS:
        parts = [left[k * len(left) // GROUPS:(k + 1) * len(left) // GROUPS] for k in range(GROUPS)]
        left = min(parts, key=lambda part: gap([i for i in range(len(words)) if i not in part]))
    assert_measures_only(grouped, left, exact)


def test_screened_leave_one_out_measures_the_words_a_first_order_estimate_of_their_removal_ranks_first(random_model):
    """Brute force on the text: the estimate is the gap's gradient at the prompt's embedding (summed over the
    prompt's generations) times the change each word's removal makes to the re-encoded embedding; the top
    SCREENED_WORDS words by it are measured exactly as leave-one-out measures them, the others not at all."""
    from memoguard.explain import SCREENED_WORDS
    from memoguard.model import gap_gradients
    words = "a large red circle on the left next to a small blue square at the top of the grey picture".split()
    assert len(words) > SCREENED_WORDS
    cond, uncond, x = _setup(random_model, [" ".join(words)], [3, 4])
    (screened,) = token_contributions(random_model, cond, uncond, x, total_steps=50, method="leave_one_out_screened")
    (exact,) = token_contributions(random_model, cond, uncond, x, total_steps=50, method="leave_one_out")
    t = random_model.timesteps(50)[0]
    rows = cond.repeat_rows(2)
    with torch.no_grad():
        eps_u = random_model.eps_uncond(x, t, uncond, cond.embedding.shape[1])
    _, grad = gap_gradients(random_model, x, t, rows, eps_u, rows.embedding, gap_of=raw_step_score)
    without = [random_model.encode([" ".join(w for j, w in enumerate(words) if j != i)]).embedding
               for i in range(len(words))]
    estimate = [-((e - cond.embedding) * grad.sum(0)).sum().item() for e in without]
    chosen = sorted(sorted(range(len(words)), key=lambda i: -estimate[i])[:SCREENED_WORDS])
    assert_measures_only(screened, chosen, exact)
    short = "a large red circle"  # every word measured, no gradient needed
    cond, uncond, x = _setup(random_model, [short], [3])
    (a,) = token_contributions(random_model, cond, uncond, x, total_steps=50, method="leave_one_out_screened")
    (b,) = token_contributions(random_model, cond, uncond, x, total_steps=50, method="leave_one_out")
    assert all(a.measured) and a.scores == pytest.approx(b.scores, rel=1e-5, abs=1e-7)


def test_the_summary_says_when_no_single_word_ends_the_recall():
    from memoguard.explain import TokenContributions
    # gap 1.0 over 4 values (RMS 0.5); without "b": L2 0.6 -> RMS 0.3
    c = TokenContributions(["a", "b", "c"], [0.1, 0.4, 0.2], [1, 2, 3], "leave_one_out", [[1], [2], [3]], 1.0, 4,
                           [True, True, True])
    assert c.score_without(1) == pytest.approx(0.3)
    assert c.summary(threshold=0.35).startswith("top words (leave-one-out): b 57%")
    assert c.summary(threshold=0.25) == ("spread over the caption: no single word ends the recall (without 'b' the "
                                         "score is 0.3000, threshold 0.2500)")
    grad = TokenContributions(["a", "b"], [0.1, 0.4], [1, 2], "gradient_x_delta", None, 1.0, 4)
    assert grad.single_word_ends(0.25) is None and grad.summary(0.25).startswith("top words (gradient x input)")


def test_shares_count_positive_scores_only():
    from memoguard.explain import TokenContributions, average_contributions
    c = TokenContributions(["a", "b", "c"], [0.3, -0.1, 0.1], [1, 2, 3], "leave_one_out")
    assert c.shares == pytest.approx([0.75, 0.0, 0.25]) and c.top(1) == [("a", pytest.approx(0.75))]
    avg = average_contributions([c, TokenContributions(["a", "b", "c"], [0.1, 0.1, 0.1], [1, 2, 3], "leave_one_out")])
    assert avg.scores == pytest.approx([0.2, 0.0, 0.1])
    with pytest.raises(ValueError, match="different prompts or methods"):
        average_contributions([c, TokenContributions(["a"], [1.0], [1], "leave_one_out")])


def test_token_removal_ends_the_recall_and_leaves_other_images_alone(tiny_model):
    from memoguard.mitigate import remove_tokens
    from memoguard.tiny.data import build_dataset
    memorized = build_dataset(0).memorized_captions[0]
    cond, uncond, x = _setup(tiny_model, [memorized, "a red circle"], [0, 0])
    t = tiny_model.timesteps(20)[0]
    new, rec = remove_tokens(tiny_model, cond, uncond, x, t, target=0.008, max_removals=3)
    assert rec.ran and rec.strategy == "remove_tokens"
    assert rec.after[0] <= 0.008 < rec.before[0] and 1 <= len(rec.removed[0]) <= 3
    # the score it reports is the score of the prompt it hands back
    eps_c, eps_u = tiny_model.eps_pair(x, t, new, uncond)
    assert step_score(eps_c - eps_u)[0].item() == pytest.approx(rec.after[0], rel=1e-4)
    assert len(new.prompt_tokens(0)) == len(cond.prompt_tokens(0)) - len(rec.removed[0])
    if rec.before[1] <= 0.008:  # an image already under target keeps its prompt bit for bit
        assert rec.removed[1] == [] and torch.equal(new.embedding[1], cond.embedding[1])


def test_strategies_through_one_front_door(tiny_model, random_model):
    from memoguard.mitigate import MitigationError, extra_cost, mitigate
    from memoguard.sampling import sample
    cond, uncond, x = _setup(tiny_model, ["a red circle", "a blue ring"], [0, 1])
    ts = tiny_model.timesteps(10)
    plan = mitigate(tiny_model, cond, uncond, x, ts, 3.0, strategy="guidance_delay", delay=0.3, target=0.0)
    assert plan.record.delay_steps == 3 and plan.guidance.shape == (10, 2)
    assert plan.guidance[:3].eq(0).all() and plan.guidance[3:].eq(3.0).all() and extra_cost(plan.record, 10) == 1.0
    # a delayed run differs from the plain one; the delay 0 run is the plain run exactly
    plain = sample(tiny_model, cond, uncond, x, 10, guidance=3.0, monitor=False).latents
    delayed = sample(tiny_model, cond, uncond, x, 10, guidance=plan.guidance, monitor=False).latents
    none = mitigate(tiny_model, cond, uncond, x, ts, 3.0, strategy="guidance_delay", delay=0.0)
    assert not torch.equal(plain, delayed)
    assert torch.equal(plain, sample(tiny_model, cond, uncond, x, 10, guidance=none.guidance, monitor=False).latents)
    auto = mitigate(tiny_model, cond, uncond, x, ts, 3.0, target=0.0)
    assert auto.record.strategy == "mask_padding"  # the default: the best measured on both evaluation models
    paper = mitigate(tiny_model, cond, uncond, x, ts, 3.0, strategy="minimize", target=0.0, max_iters=2)
    assert paper.record.iterations == 2 and all(a < b for a, b in zip(paper.record.after, paper.record.before))
    with pytest.raises(MitigationError, match="strategy must be one of"):
        mitigate(tiny_model, cond, uncond, x, ts, 3.0, strategy="prayer")
    no_ids = cond.with_embedding(cond.embedding)
    no_ids.ids = None
    with pytest.raises(MitigationError, match="use the strategy 'minimize'"):
        mitigate(tiny_model, no_ids, uncond, x, ts, 3.0, strategy="remove_tokens")


def test_guidance_delay_plan_from_scores_a_host_already_has():
    from memoguard.mitigate import MitigationError, plan_guidance_delay
    gap = torch.tensor([0.03, 0.01, 0.05])
    plan, rec = plan_guidance_delay(gap, 20, mode="auto", threshold=0.02, delay=0.25)
    assert plan.images.tolist() == [True, False, True] and plan.steps == 5 and rec.delay_steps == 5
    assert plan.applies(4) and not plan.applies(5) and rec.image_iterations == [5, 0, 5]
    # the reason is the bound the image did not pass: 0.01 is above the target 0 but under the threshold
    assert rec.summary(1) == "delayed guidance: not needed for this image (first-step score 0.0100 under the threshold 0.0200)"
    _, always = plan_guidance_delay(gap, 20, mode="always", target=0.02, delay=0.25)
    assert always.summary(1).endswith("(first-step score 0.0100 already at or under the target 0.0200)")
    sched = plan.schedule(20, 7.0)
    assert sched[:5, 1].eq(7.0).all() and sched[:5, 0].eq(0).all() and sched[5:].eq(7.0).all()
    none, rec = plan_guidance_delay(gap, 20, mode="auto", threshold=1.0)
    assert none is None and "under threshold" in rec.reason
    with pytest.raises(MitigationError, match="delay must be in"):
        plan_guidance_delay(gap, 20, delay=1.0)


def test_new_noise_keeps_the_prompt_and_records_a_seed_that_remakes_the_noise(tiny_model):
    from memoguard.mitigate import candidate_seed, mitigate
    seeds = [10, 11, 12]
    cond, uncond, x = _setup(tiny_model, ["a red circle", "a blue ring", "a green square"], seeds)
    ts = tiny_model.timesteps(10)
    noise_of = lambda s: initial_noise(tiny_model, tiny_model.latent_shape(), s, tiny_model.device)
    first = mitigate(tiny_model, cond, uncond, x, ts, 3.0, strategy="new_noise", target=0.0, seeds=seeds,
                     noise_of=noise_of, noise_candidates=3)
    rec = first.record
    before = torch.tensor(rec.before)
    # target 0: every image searches all 3 candidates and keeps the lowest score of the four noises
    assert rec.image_iterations == [3, 3, 3] and rec.passes == pytest.approx(2 + 2 * 3)
    assert rec.seeds.count(None) < 3  # on this model, at these seeds, some candidate scores lower
    for b, seed in enumerate(seeds):
        assert rec.after[b] <= rec.before[b]
        if rec.seeds[b] is None:
            assert torch.equal(first.x_T[b], x[b])
        else:
            assert rec.seeds[b] in [candidate_seed(seed, k) for k in (1, 2, 3)]
            assert torch.equal(first.x_T[b], noise_of([rec.seeds[b]])[0])  # the recorded seed remakes the noise
    assert torch.equal(first.cond.embedding, cond.embedding)  # the prompt is kept
    # an image already under the target keeps its own noise bit for bit
    target = float(before.median())
    kept = mitigate(tiny_model, cond, uncond, x, ts, 3.0, strategy="new_noise", target=target, seeds=seeds,
                    noise_of=noise_of)
    for b in range(3):
        if before[b] <= target:
            assert kept.record.seeds[b] is None and torch.equal(kept.x_T[b], x[b])
    moved = [s is not None for s in rec.seeds].index(True)
    assert f"new initial noise: seed {rec.seeds[moved]}, first-step score" in rec.summary(moved)


def test_optimized_noise_lowers_the_first_step_score_and_leaves_images_under_the_target_alone(tiny_model):
    from memoguard.mitigate import SAIL_GAUSSIAN_WEIGHT, mitigate
    from memoguard.score import step_score
    cond, uncond, x = _setup(tiny_model, ["a red circle", "a blue ring", "a green square"], [10, 11, 12])
    ts = tiny_model.timesteps(10)
    plan = mitigate(tiny_model, cond, uncond, x, ts, 3.0, strategy="optimize_noise", target=0.0, max_iters=3)
    rec = plan.record
    assert torch.equal(plan.cond.embedding, cond.embedding) and plan.guidance is None  # the prompt is kept
    with torch.no_grad():  # the recorded score after is the new noise's own first-step score
        eps_u = tiny_model.eps_uncond(plan.x_T, ts[0], uncond, cond.embedding.shape[1])
        rescored = step_score(tiny_model.eps(plan.x_T, ts[0], cond.embedding, cond.extra) - eps_u)
    for b in range(3):
        assert 0 < rec.image_iterations[b] <= 3 and rec.after[b] < rec.before[b]
        assert rec.after[b] == pytest.approx(float(rescored[b]), rel=1e-4)
    # per Adam step and image: the pair at the noise, the pair one unit along the difference, a backward through
    # the four (2 each); the first step's pair again with gradients, and the last noise scored
    assert rec.passes == pytest.approx(2 + 3 * (2 + 2 + 8) + 2)
    assert 0 < SAIL_GAUSSIAN_WEIGHT and rec.summary(0).startswith("optimized initial noise (SAIL): noise optimized")
    # an image under the target keeps its noise bit for bit; the others still move
    target = float(torch.tensor(rec.before).median())
    kept = mitigate(tiny_model, cond, uncond, x, ts, 3.0, strategy="optimize_noise", target=target, max_iters=2)
    for b in range(3):
        assert torch.equal(kept.x_T[b], x[b]) == (rec.before[b] <= target)
    # deterministic: the same settings remake the same noise
    again = mitigate(tiny_model, cond, uncond, x, ts, 3.0, strategy="optimize_noise", target=0.0, max_iters=3)
    assert torch.equal(again.x_T, plan.x_T)


def test_opposite_guidance_and_a_start_followed_by_a_schedule(tiny_model):
    from memoguard.mitigate import MitigationError, mitigate
    from memoguard.sampling import sample
    cond, uncond, x = _setup(tiny_model, ["a red circle", "a blue ring"], [0, 1])
    ts = tiny_model.timesteps(10)
    opposite = mitigate(tiny_model, cond, uncond, x, ts, 3.0, strategy="opposite_guidance", delay=0.2,
                        early_scale=-2.0)
    assert opposite.guidance[:2].eq(-2.0).all() and opposite.guidance[2:].eq(3.0).all()
    assert opposite.record.summary(0).endswith("guidance -2 (away from the prompt) for the first 2 steps")
    delayed = mitigate(tiny_model, cond, uncond, x, ts, 3.0, strategy="guidance_delay", delay=0.2)
    a = sample(tiny_model, cond, uncond, x, 10, guidance=opposite.guidance, monitor=False).latents
    b = sample(tiny_model, cond, uncond, x, 10, guidance=delayed.guidance, monitor=False).latents
    assert not torch.equal(a, b)
    with pytest.raises(MitigationError, match="early_scale must be <= 0"):
        mitigate(tiny_model, cond, uncond, x, ts, 3.0, strategy="opposite_guidance", early_scale=1.0)
    # its defaults are the measured best (0.2 of the steps at -3); delayed guidance keeps its own (0.3)
    default = mitigate(tiny_model, cond, uncond, x, ts, 3.0, strategy="opposite_guidance")
    assert default.guidance[:2].eq(-3.0).all() and default.guidance[2:].eq(3.0).all()
    assert mitigate(tiny_model, cond, uncond, x, ts, 3.0, strategy="guidance_delay").record.delay_steps == 3
    # the schedule of a combination applies to the images its start changed, and only to them
    rec0 = mitigate(tiny_model, cond, uncond, x, ts, 3.0, strategy="remove_tokens", target=0.0).record
    target = min(rec0.before) * 1.0001  # the lower-scoring image is left alone, the other is edited
    combo = mitigate(tiny_model, cond, uncond, x, ts, 3.0, strategy="remove_tokens+guidance_delay", target=target,
                     delay=0.3)
    changed = [n > 0 for n in combo.record.image_iterations]
    assert changed.count(True) == 1 and combo.record.strategy == "remove_tokens+guidance_delay"
    for b, c in enumerate(changed):
        assert combo.guidance[:3, b].eq(0.0 if c else 3.0).all() and combo.guidance[3:, b].eq(3.0).all()
    edited = changed.index(True)
    assert combo.record.summary(edited).startswith("token removal + delayed guidance: removed ")
    assert combo.record.summary(edited).endswith("; then no text guidance for the first 3 steps")
    with pytest.raises(MitigationError, match="needs each image's seed"):
        mitigate(tiny_model, cond, uncond, x, ts, 3.0, strategy="new_noise")


def test_padding_masking_zeroes_only_the_padding_after_the_end_of_text(tiny_model):
    """Every image over the target gets its padding zeroed and the record the masked score: lower for the memorized
    captions, higher for these ordinary ones on this model (masked all the same, as the paper masks every prompt)."""
    from memoguard.mitigate import MitigationError, mitigate, padding_positions
    from memoguard.tiny.data import build_dataset
    captions = build_dataset(0).memorized_captions
    texts = [captions[0], captions[3], "a red circle", "a blue ring on the left"]
    cond, uncond, x = _setup(tiny_model, texts, [0, 1, 0, 1])
    ts = tiny_model.timesteps(10)
    pads = [padding_positions(cond, b) for b in range(4)]
    words = [len(cond.prompt_tokens(b)) for b in range(4)]
    for b in range(4):  # BOS, the words, their end-of-text, then padding to 77
        assert pads[b] == list(range(words[b] + 2, 77)) and cond.tokens[b][words[b] + 1] == "<|endoftext|>"
    plan = mitigate(tiny_model, cond, uncond, x, ts, 3.0, strategy="mask_padding", target=0.0)
    rec, emb = plan.record, plan.cond.embedding
    for b in range(4):
        assert emb[b, pads[b]].eq(0).all() and torch.equal(emb[b, :pads[b][0]], cond.embedding[b, :pads[b][0]])
        assert rec.masked[b] == len(pads[b]) and f"{len(pads[b])} padding positions zeroed" in rec.summary(b)
    assert rec.after[0] < rec.before[0] and rec.after[1] < rec.before[1]
    assert rec.after[2] > rec.before[2] and rec.after[3] > rec.before[3]
    # the score it reports is the score of the embedding it hands back; one pass more than scoring
    eps_c, eps_u = tiny_model.eps_pair(x, ts[0], plan.cond, uncond)
    assert step_score(eps_c - eps_u).tolist() == pytest.approx(rec.after, rel=1e-4)
    assert rec.passes == pytest.approx(3.0) and plan.guidance is None and plan.x_T is None
    # half: the padding nearest the end-of-text; an image under the target keeps its embedding bit for bit
    half = mitigate(tiny_model, cond, uncond, x, ts, 3.0, strategy="mask_padding", pad_share=0.5,
                    target=rec.before[0] * 1.0001).cond.embedding
    assert torch.equal(half[0], cond.embedding[0])
    n = (len(pads[1]) + 1) // 2
    assert half[1, pads[1][:n]].eq(0).all() and torch.equal(half[1, pads[1][n:]], cond.embedding[1, pads[1][n:]])
    with pytest.raises(MitigationError, match="pad_share must be in"):
        mitigate(tiny_model, cond, uncond, x, ts, 3.0, strategy="mask_padding", pad_share=0.0)


def _small_memory(monkeypatch, model, limit):
    """`model`, but a forward of more than `limit` images runs out of memory (as a big model at a big size does);
    returns the batch sizes it was called with."""
    calls, inner = [], model.raw_prediction

    def raw_prediction(x, t, embedding, extra):
        calls.append(x.shape[0])
        if x.shape[0] > limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 6.00 GiB")
        return inner(x, t, embedding, extra)
    monkeypatch.setattr(model, "raw_prediction", raw_prediction)
    return calls


def test_leave_one_out_and_token_removal_go_on_at_the_batch_memory_holds(random_model, tiny_model, monkeypatch):
    """Out of memory inside a batch of edited prompts halves the batch and goes on: the same numbers as a small
    batch, no failure; out of memory at one image is still an error (the host's fallback then applies)."""
    from memoguard.mitigate import remove_tokens
    cond, uncond, x = _setup(random_model, [PROMPT], [3, 4])
    (ref,) = token_contributions(random_model, cond, uncond, x, total_steps=50, method="leave_one_out", batch_size=2)
    calls = _small_memory(monkeypatch, random_model, limit=2)
    (got,) = token_contributions(random_model, cond, uncond, x, total_steps=50, method="leave_one_out", batch_size=16)
    assert got.scores == pytest.approx(ref.scores, rel=1e-5, abs=1e-7) and max(calls) > 2
    t = tiny_model.timesteps(20)[0]
    cond, uncond, x = _setup(tiny_model, ["a purple ring, lighthouse poster"], [0])
    _, ref = remove_tokens(tiny_model, cond, uncond, x, t, target=0.0, max_removals=1, batch_size=1)
    calls = _small_memory(monkeypatch, tiny_model, limit=3)
    _, got = remove_tokens(tiny_model, cond, uncond, x, t, target=0.0, max_removals=1, batch_size=16)
    assert got.removed == ref.removed and got.after == pytest.approx(ref.after, rel=1e-5) and max(calls) > 3
    monkeypatch.undo()
    _small_memory(monkeypatch, tiny_model, limit=0)
    with pytest.raises(torch.OutOfMemoryError):
        remove_tokens(tiny_model, cond, uncond, x, t, target=0.0, max_removals=1)
