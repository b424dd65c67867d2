"""The papers' columns in the Table 1 and Table 2 reports say what they are: the best test epoch (issue 29, 5).

LDAM-DRW's cifar_train.py and Yang & Xu's train.py / train_semi.py test after every epoch and keep
``best_acc1 = max(acc1, best_acc1)``, so the published figures are the best test accuracy over the epochs, while
imbssl selects its epoch on a validation set. A reader comparing the two columns must see the difference.
"""
from __future__ import annotations

from imbssl.recipes import semi_supervised, ssp
from imbssl.recipes.grid import Results

NO_RUNS = Results(recipe="test", command="test", cells=[])


def test_table2_report_labels_the_papers_columns_best_test_epoch():
    exp = ssp.SSPExperimentConfig(seeds=[0], imbalances=[100, 10], rows=["ce", "cb-focal"], ssp=["none"],
                                  base={"data": {"source": "digits"}})
    header = exp.error_table(NO_RUNS, "cifar10").splitlines()[0].split(" | ")
    papers = [column for column in header if column.startswith("paper")]
    assert len(papers) == 2 and all("best test epoch" in column for column in papers), header
    assert not any("best test epoch" in column for column in header if column not in papers)  # ours: validation


def test_table1_report_labels_the_seeds_columns_best_test_epoch():
    exp = semi_supervised.SemiSupervisedExperimentConfig(imbalances=[100], unlabeled_imbalances=["1", "rho"],
                                                         ssp=["none"], losses=["ce"])
    header = exp.error_table(NO_RUNS, paper=True).splitlines()[0].split(" | ")
    seeds = [column for column in header if column.startswith("seed")]
    assert len(seeds) == 2 and all("best test epoch" in column for column in seeds), header
    assert not any("best test epoch" in column for column in header if column not in seeds)
