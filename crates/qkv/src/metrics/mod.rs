//! Evaluation metrics: sacreBLEU-exact BLEU and chrF ([`sacrebleu`]), ROUGE exactly as
//! `rouge-score` ([`rouge`]), classification accuracy,
//! macro-F1 and confusion matrix, and language-model perplexity / bits per character.

pub mod rouge;
pub mod sacrebleu;

/// Classification scores from gold and predicted labels in `0..n_classes`.
#[derive(Clone, Debug, PartialEq)]
pub struct ClassificationReport {
    pub accuracy: f64,
    /// Unweighted mean of per-class F1 (a class never gold nor predicted counts as F1 = 0,
    /// as scikit-learn's `f1_score(average="macro", zero_division=0)`).
    pub macro_f1: f64,
    pub per_class_f1: Vec<f64>,
    /// `confusion[gold][pred]` counts.
    pub confusion: Vec<Vec<usize>>,
}

pub fn classification_report(gold: &[u32], pred: &[u32], n_classes: usize) -> ClassificationReport {
    let mut confusion = vec![vec![0usize; n_classes]; n_classes];
    for (&g, &p) in gold.iter().zip(pred) {
        if (g as usize) < n_classes && (p as usize) < n_classes {
            confusion[g as usize][p as usize] += 1;
        }
    }
    let correct: usize = (0..n_classes).map(|k| confusion[k][k]).sum();
    let per_class_f1: Vec<f64> = (0..n_classes)
        .map(|k| {
            let tp = confusion[k][k] as f64;
            let gold_k: usize = confusion[k].iter().sum();
            let pred_k: usize = confusion.iter().map(|row| row[k]).sum();
            let denom = (gold_k + pred_k) as f64;
            if denom == 0.0 {
                0.0
            } else {
                2.0 * tp / denom
            }
        })
        .collect();
    ClassificationReport {
        accuracy: correct as f64 / gold.len().max(1) as f64,
        macro_f1: per_class_f1.iter().sum::<f64>() / n_classes.max(1) as f64,
        per_class_f1,
        confusion,
    }
}

/// Perplexity from a mean per-token negative log-likelihood in nats.
pub fn perplexity(mean_nll: f64) -> f64 {
    mean_nll.exp()
}

/// Bits per character: total NLL (nats) over the tokens of a text, divided by its characters.
pub fn bits_per_char(total_nll: f64, n_chars: usize) -> f64 {
    total_nll / std::f64::consts::LN_2 / n_chars.max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_matches_hand_computed_values() {
        // gold: 0 0 1 1 2 2, pred: 0 1 1 1 2 0
        let r = classification_report(&[0, 0, 1, 1, 2, 2], &[0, 1, 1, 1, 2, 0], 3);
        assert!((r.accuracy - 4.0 / 6.0).abs() < 1e-12);
        // F1: class0 2·1/(2+2)=0.5, class1 2·2/(2+3)=0.8, class2 2·1/(2+1)=2/3
        let want = [0.5, 0.8, 2.0 / 3.0];
        for (a, b) in r.per_class_f1.iter().zip(want) {
            assert!((a - b).abs() < 1e-12);
        }
        assert!((r.macro_f1 - (0.5 + 0.8 + 2.0 / 3.0) / 3.0).abs() < 1e-12);
        assert_eq!(
            r.confusion,
            vec![vec![1, 1, 0], vec![0, 2, 0], vec![1, 0, 1]]
        );
        assert!((bits_per_char(std::f64::consts::LN_2 * 10.0, 5) - 2.0).abs() < 1e-12);
    }
}
