"""Greedy ensemble selection (Caruana 2004) and its class-wise refinement on synthetic probability sets
(quantised to uint8, the form val probabilities are cached and selected in)."""
import numpy as np
import torch

from models.ensemble import ensemble_confusion, ensemble_miou, greedy_selection, per_class_selection, quantize


def _one_hot_probs(labels, num_classes, noise, seed):
    g = torch.Generator().manual_seed(seed)
    probs = torch.nn.functional.one_hot(labels, num_classes).permute(0, 3, 1, 2).float()
    probs = probs + noise * torch.rand(probs.shape, generator=g)
    return probs / probs.sum(1, keepdim=True)


def test_complementary_members_beat_each_alone():
    labels = torch.randint(0, 3, (4, 8, 8), generator=torch.Generator().manual_seed(0))
    left, right = _one_hot_probs(labels, 3, 0.1, 1), _one_hot_probs(labels, 3, 0.1, 2)
    # Member 0 is confidently right on the left half and weakly wrong on the right; member 1 the mirror
    # image: their sum is right everywhere.
    left[..., 4:] = torch.tensor([0.5, 0.25, 0.25])[None, :, None, None]
    right[..., :4] = torch.tensor([0.25, 0.25, 0.5])[None, :, None, None]
    selection = greedy_selection([quantize(left), quantize(right)], labels, 3, max_rounds=6)
    assert selection.val_miou > max(selection.member_miou)
    assert selection.val_miou == 1.0
    assert abs(sum(selection.weights) - 1) < 1e-9 and all(w > 0 for w in selection.weights)


def test_starts_from_best_single_model_and_never_ends_below_it():
    rng = np.random.default_rng(0)
    labels = torch.from_numpy(rng.integers(0, 4, (6, 8, 8)))
    members = [quantize(torch.from_numpy(rng.random((6, 4, 8, 8)))) for _ in range(4)]
    members.append(quantize(_one_hot_probs(labels, 4, 2.0, 5)))  # the best single member
    selection = greedy_selection(members, labels, 4, max_rounds=8)
    assert selection.path[0]["members"] == [4]
    assert selection.val_miou >= max(selection.member_miou)
    assert len(selection.path) == 8


def test_selected_weights_reproduce_the_reported_score():
    rng = np.random.default_rng(1)
    labels = torch.from_numpy(rng.integers(0, 3, (5, 6, 6)))
    members = [quantize(_one_hot_probs(labels, 3, float(n), n)) for n in (3, 4, 5)]
    selection = greedy_selection(members, labels, 3, max_rounds=5)
    assert abs(ensemble_miou(list(zip(selection.counts, members)), labels, 3) - selection.val_miou) < 1e-12
    assert torch.equal(selection.confusion, ensemble_confusion(list(zip(selection.counts, members)), labels, 3))
    assert abs(sum(selection.weights) - 1) < 1e-12



def _reference_greedy(members, labels, num_classes, rounds):
    """The textbook version: re-sum the chosen members and recount everything for each candidate."""
    chosen = [int(np.argmax([ensemble_miou([(1.0, m)], labels, num_classes) for m in members]))]
    for _ in range(rounds - 1):
        scores = [ensemble_miou([(1.0, members[i]) for i in chosen + [c]], labels, num_classes)
                  for c in range(len(members))]
        chosen.append(int(np.argmax(scores)))
    return chosen


def test_incremental_confusion_matrices_pick_the_same_path_as_recounting():
    g = torch.Generator().manual_seed(7)
    labels = torch.randint(0, 5, (9, 12, 12), generator=g)
    labels[0, :3] = 255  # ignored pixels must stay out of every count
    members = [quantize(_one_hot_probs(labels.clamp(max=4), 5, noise, seed)) for noise, seed in
               ((1.0, 1), (2.0, 2), (3.0, 3), (1.5, 4))]
    selection = greedy_selection(members, labels, 5, max_rounds=6)
    assert [m for s in selection.path for m in s["members"]] == _reference_greedy(members, labels, 5, 6)
    for step in selection.path:
        chosen = [m for s in selection.path[:step["round"]] for m in s["members"]]
        assert abs(ensemble_miou([(1.0, members[i]) for i in chosen], labels, 5) - step["val_miou"]) < 1e-12


def test_ties_between_classes_do_not_change_the_path():
    # Probabilities in steps of 0.5 tie often: the skipped-pixel shortcut must still agree.
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        labels = torch.randint(0, 4, (6, 10, 10), generator=g)
        members = [quantize(torch.randint(0, 3, (6, 4, 10, 10), generator=g).float() / 2) for _ in range(4)]
        selection = greedy_selection(members, labels, 4, max_rounds=6)
        assert [m for s in selection.path for m in s["members"]] == _reference_greedy(members, labels, 4, 6)


def test_greedy_reaches_the_best_small_integer_weighting_found_by_brute_force():
    import itertools

    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 3, (4, 8, 8), generator=g)
    left, right = _one_hot_probs(labels, 3, 0.2, 1), _one_hot_probs(labels, 3, 0.2, 2)
    left[..., 4:] = torch.tensor([0.6, 0.4, 0.0])[None, :, None, None]  # unsure (and often wrong) on the right half
    right[..., :4] = torch.tensor([0.0, 0.4, 0.6])[None, :, None, None]  # unsure on the left half
    noisy = _one_hot_probs(labels, 3, 8.0, 4)  # weaker alone than either half-expert
    members = [quantize(m) for m in (left, right, noisy)]
    rounds = 4
    brute = max(ensemble_miou([(float(c), m) for c, m in zip(counts, members)], labels, 3)
                for counts in itertools.product(range(rounds + 1), repeat=3) if 0 < sum(counts) <= rounds)
    selection = greedy_selection(members, labels, 3, max_rounds=rounds)
    assert selection.val_miou > max(selection.member_miou)
    assert abs(selection.val_miou - brute) < 1e-12


def test_uint8_probabilities_are_required():
    import pytest

    with pytest.raises(TypeError, match="uint8 probabilities"):
        greedy_selection([torch.rand(1, 2, 4, 4)], torch.zeros(1, 4, 4, dtype=torch.long), 2)


def _rare_class_case():
    """Member 0 is right everywhere except on class 3 (rare: one 4x4 patch per image), which it calls
    background; member 1 finds class 3 but is confidently wrong on class 1."""
    g = torch.Generator().manual_seed(5)
    labels = torch.randint(0, 3, (6, 16, 16), generator=g)
    labels[:, 4:8, 4:8] = 3
    good = _one_hot_probs(labels, 4, 0.3, 1)
    good[:, :, 4:8, 4:8] = torch.tensor([0.7, 0.0, 0.0, 0.3])[None, :, None, None]
    finder = _one_hot_probs(labels, 4, 0.3, 2)
    for i in range(len(labels)):
        finder[i, :, labels[i] == 1] = torch.tensor([0.0, 0.0, 1.0, 0.0])[:, None]  # calls class 1 class 2
    return labels, [quantize(good), quantize(finder)]


def test_per_class_weights_let_a_rare_class_specialist_contribute_only_there():
    labels, members = _rare_class_case()
    selection = greedy_selection(members, labels, 4, max_rounds=4)
    refined = per_class_selection(members, labels, 4, selection.counts, max_rounds=6)
    assert refined.start_miou == selection.val_miou
    assert refined.val_miou > selection.val_miou
    assert refined.path and {step["class"] for step in refined.path} == {3}
    # the specialist weighs in on class 3 only; the scores it reports are the ones the weights give
    assert refined.counts[1][3] > refined.counts[1][1] == refined.counts[1][0]
    assert abs(ensemble_miou(list(zip(refined.counts, members)), labels, 4) - refined.val_miou) < 1e-12
    assert torch.equal(refined.confusion, ensemble_confusion(list(zip(refined.counts, members)), labels, 4))
    steps = refined.path
    assert all(a["val_miou"] < b["val_miou"] for a, b in zip(steps, steps[1:]))


def test_per_class_refinement_matches_an_exhaustive_search_of_each_step():
    """Each accepted step is the best of all (member, class) additions, recounted from scratch."""
    g = torch.Generator().manual_seed(11)
    labels = torch.randint(0, 4, (5, 8, 8), generator=g)
    members = [quantize(_one_hot_probs(labels, 4, noise, seed)) for noise, seed in ((2.0, 1), (3.0, 2), (2.5, 3))]
    selection = greedy_selection(members, labels, 4, max_rounds=3)
    refined = per_class_selection(members, labels, 4, selection.counts, max_rounds=4)
    counts = [[c] * 4 for c in selection.counts]
    score = selection.val_miou
    for step in refined.path:
        options = {}
        for member in range(3):
            for cls in range(4):
                trial = [row[:] for row in counts]
                trial[member][cls] += 1
                options[(member, cls)] = ensemble_miou(list(zip(trial, members)), labels, 4)
        best = max(options.values())
        assert best > score and abs(options[(step["member"], step["class"])] - best) < 1e-12
        counts[step["member"]][step["class"]] += 1
        score = best
    assert counts == refined.counts


def test_a_latency_budget_keeps_expensive_members_out():
    import pytest

    from models.ensemble import OverBudget

    g = torch.Generator().manual_seed(2)
    labels = torch.randint(0, 3, (4, 8, 8), generator=g)
    members = [quantize(_one_hot_probs(labels, 3, noise, seed)) for noise, seed in ((4.0, 1), (0.5, 2), (3.0, 3))]
    costs = [1.0, 5.0, 1.5]  # member 1, the best alone, is the slowest
    free = greedy_selection(members, labels, 3, max_rounds=4)
    assert free.path[0]["members"] == [1]
    capped = greedy_selection(members, labels, 3, max_rounds=4, costs=costs, budget=2.5)
    used = {m for step in capped.path for m in step["members"]}
    assert 1 not in used and sum(costs[m] for m in used) <= 2.5
    assert capped.path[0]["members"] == [max((0, 2), key=lambda m: capped.member_miou[m])]
    refined = per_class_selection(members, labels, 3, capped.counts, max_rounds=4, costs=costs, budget=2.5)
    assert all(refined.counts[1][c] == 0 for c in range(3))
    with pytest.raises(OverBudget, match="cheapest costs 1"):
        greedy_selection(members, labels, 3, costs=costs, budget=0.5)


def _majority_case():
    """Three members, each confidently wrong on its own band of columns and right elsewhere: any pair keeps
    both members' mistakes (each one's wrong class outweighs the other's right one), so every pair scores
    below the best member and greedy never adds a second; all three together outvote every mistake."""
    labels = torch.randint(0, 3, (4, 12, 12), generator=torch.Generator().manual_seed(4))
    wrong = (labels + 1) % 3
    members = []
    for band in (slice(0, 3), slice(3, 7), slice(7, 11)):  # member 0 errs least: the best alone
        probs = torch.full((4, 3, 12, 12), 0.1)
        probs.scatter_(1, labels[:, None], 0.8)
        err = torch.full((4, 3, 12, 12), 0.05).scatter_(1, wrong[:, None], 0.9)
        probs[..., band] = err[..., band]
        members.append(quantize(probs))
    return labels, members


def test_a_combination_behind_a_dip_is_found_that_greedy_from_the_best_member_misses():
    import itertools

    from models.ensemble import ensemble_selection

    labels, members = _majority_case()
    greedy = greedy_selection(members, labels, 3, max_rounds=6)
    assert sum(1 for c in greedy.counts if c) == 1  # plain greedy stays at the best member
    pairs = [ensemble_miou([(1.0, members[a]), (1.0, members[b])], labels, 3)
             for a, b in itertools.combinations(range(3), 2)]
    assert max(pairs) < max(greedy.member_miou)  # the dip
    brute = max(ensemble_miou([(1.0, members[m]) for m in subset], labels, 3)
                for n in (1, 2, 3) for subset in itertools.combinations(range(3), n))
    assert brute > greedy.val_miou
    selection = ensemble_selection(members, labels, 3, max_rounds=6)
    assert selection.val_miou >= brute
    assert selection.start == "best subset" and selection.path[0]["members"] == [0, 1, 2]
    assert selection.tried == {"best member": greedy.val_miou, "best subset": selection.val_miou}
    assert abs(ensemble_miou(list(zip(selection.counts, members)), labels, 3) - selection.val_miou) < 1e-12
    assert sum(1 for w in selection.weights if w) >= 2


def test_without_a_better_combination_the_selection_is_plain_greedy():
    from models.ensemble import ensemble_selection

    rng = np.random.default_rng(0)
    labels = torch.from_numpy(rng.integers(0, 4, (6, 8, 8)))
    members = [quantize(torch.from_numpy(rng.random((6, 4, 8, 8)))) for _ in range(3)]
    members.append(quantize(_one_hot_probs(labels, 4, 0.5, 5)))  # far better than the noise members
    selection = ensemble_selection(members, labels, 4, max_rounds=4)
    assert selection.start == "best member" and list(selection.tried) == ["best member"]
    assert selection.counts == [0, 0, 0, 1] and selection.val_miou == max(selection.member_miou)
    assert selection.stopped.startswith("no round after round 1 raised val mIoU")


def test_the_subset_start_keeps_to_a_latency_budget():
    from models.ensemble import best_subset

    labels, members = _majority_case()
    miou = [ensemble_miou([(1.0, m)], labels, 3) for m in members]
    assert best_subset(members, labels, 3, miou) == [0, 1, 2]
    assert len(best_subset(members, labels, 3, miou, costs=[1.0, 1.0, 1.0], budget=2.0)) == 1
