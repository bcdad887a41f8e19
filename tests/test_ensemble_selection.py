"""Greedy ensemble selection (Caruana 2004) on synthetic probability sets."""
import numpy as np
import torch

from models.ensemble import ensemble_miou, greedy_selection


def _one_hot_probs(labels, num_classes, noise, seed):
    g = torch.Generator().manual_seed(seed)
    probs = torch.nn.functional.one_hot(labels, num_classes).permute(0, 3, 1, 2).float()
    probs = probs + noise * torch.rand(probs.shape, generator=g)
    return probs / probs.sum(1, keepdim=True)


def test_complementary_members_beat_each_alone():
    labels = torch.randint(0, 3, (4, 8, 8), generator=torch.Generator().manual_seed(0))
    left, right = _one_hot_probs(labels, 3, 0.1, 1), _one_hot_probs(labels, 3, 0.1, 2)
    left[..., 4:] = torch.tensor([1.0, 0.0, 0.0])[None, :, None, None]  # left half right only
    right[..., :4] = torch.tensor([0.0, 0.0, 1.0])[None, :, None, None]  # right half right only
    # Member 0 is wrong on its right half, member 1 on its left; summing them fixes both... only where
    # the confident wrong vote is weaker, so make the good halves more confident.
    left[..., :4] *= 3
    right[..., 4:] *= 3
    selection = greedy_selection([left, right], labels, 3, max_rounds=6)
    assert selection.val_miou > max(selection.member_miou)
    assert selection.val_miou == 1.0
    assert abs(sum(selection.weights) - 1) < 1e-9 and all(w > 0 for w in selection.weights)


def test_starts_from_best_single_model_and_never_ends_below_it():
    rng = np.random.default_rng(0)
    labels = torch.from_numpy(rng.integers(0, 4, (6, 8, 8)))
    members = [torch.from_numpy(rng.random((6, 4, 8, 8))).half() for _ in range(4)]
    members.append(_one_hot_probs(labels, 4, 2.0, 5).half())  # the best single member
    selection = greedy_selection(members, labels, 4, max_rounds=8)
    assert selection.path[0]["member"] == 4
    assert selection.val_miou >= max(selection.member_miou)
    assert len(selection.path) == 8


def test_selected_weights_reproduce_the_reported_score():
    rng = np.random.default_rng(1)
    labels = torch.from_numpy(rng.integers(0, 3, (5, 6, 6)))
    members = [_one_hot_probs(labels, 3, float(n), n) for n in (3, 4, 5)]
    selection = greedy_selection(members, labels, 3, max_rounds=5)
    assert abs(ensemble_miou(list(zip(selection.weights, members)), labels, 3) - selection.val_miou) < 1e-12



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
    members = [_one_hot_probs(labels.clamp(max=4), 5, noise, seed) for noise, seed in
               ((1.0, 1), (2.0, 2), (3.0, 3), (1.5, 4))]
    selection = greedy_selection(members, labels, 5, max_rounds=6, chunk=4)
    assert [s["member"] for s in selection.path] == _reference_greedy(members, labels, 5, 6)
    for step in selection.path:
        chosen = [s["member"] for s in selection.path[:step["round"]]]
        assert abs(ensemble_miou([(1.0, members[i]) for i in chosen], labels, 5) - step["val_miou"]) < 1e-12


def test_ties_between_classes_do_not_change_the_path():
    # Probabilities in steps of 0.5 tie often: the skipped-pixel shortcut must still agree.
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        labels = torch.randint(0, 4, (6, 10, 10), generator=g)
        members = [(torch.randint(0, 3, (6, 4, 10, 10), generator=g).float() / 2).half() for _ in range(4)]
        selection = greedy_selection(members, labels, 4, max_rounds=6, chunk=4)
        assert [s["member"] for s in selection.path] == _reference_greedy(members, labels, 4, 6)


def test_greedy_reaches_the_best_small_integer_weighting_found_by_brute_force():
    import itertools

    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 3, (4, 8, 8), generator=g)
    left, right = _one_hot_probs(labels, 3, 0.2, 1), _one_hot_probs(labels, 3, 0.2, 2)
    left[..., 4:] = torch.tensor([0.6, 0.4, 0.0])[None, :, None, None]  # unsure (and often wrong) on the right half
    right[..., :4] = torch.tensor([0.0, 0.4, 0.6])[None, :, None, None]  # unsure on the left half
    noisy = _one_hot_probs(labels, 3, 8.0, 4)  # weaker alone than either half-expert
    members = [left, right, noisy]
    rounds = 4
    brute = max(ensemble_miou([(float(c), m) for c, m in zip(counts, members)], labels, 3)
                for counts in itertools.product(range(rounds + 1), repeat=3) if 0 < sum(counts) <= rounds)
    selection = greedy_selection(members, labels, 3, max_rounds=rounds)
    assert selection.val_miou > max(selection.member_miou)
    assert abs(selection.val_miou - brute) < 1e-12
