//! ROUGE-1, ROUGE-2 and ROUGE-L (Lin, 2004) exactly as Google's `rouge-score` 0.1.2 computes
//! them: its tokenizer (lowercase, every run of characters outside `[a-z0-9]` is a separator)
//! and, with the stemmer on, NLTK's Porter stemmer in its default `NLTK_EXTENSIONS` mode
//! (nltk 3.10) applied to tokens longer than three characters. A corpus score is the mean of
//! the examples' scores, as the summarisation literature and this project's baselines report.
//!
//! Written by hand: no crate reproduces `rouge-score` (crates.io's ROUGE crates tokenize and
//! stem differently, and the Porter crates implement Martin Porter's original algorithm, not
//! NLTK's variant), and a metric is only comparable when it is the same to the last digit.

use std::collections::HashMap;

/// Precision, recall and F1 of one ROUGE variant (fractions, not percentages).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Score {
    pub precision: f64,
    pub recall: f64,
    pub fmeasure: f64,
}

impl Score {
    fn new(precision: f64, recall: f64) -> Self {
        let fmeasure = if precision + recall > 0.0 {
            2.0 * precision * recall / (precision + recall)
        } else {
            0.0
        };
        Self {
            precision,
            recall,
            fmeasure,
        }
    }
}

/// ROUGE-1, ROUGE-2 and ROUGE-L of one prediction, or the mean over a corpus.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Rouge {
    pub rouge1: Score,
    pub rouge2: Score,
    pub rouge_l: Score,
}

impl std::fmt::Display for Rouge {
    /// F1 × 100, as papers report ROUGE.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ROUGE-1 {:.2} / ROUGE-2 {:.2} / ROUGE-L {:.2} (F1 × 100)",
            100.0 * self.rouge1.fmeasure,
            100.0 * self.rouge2.fmeasure,
            100.0 * self.rouge_l.fmeasure
        )
    }
}

/// `rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer).score(target,
/// prediction)`.
pub fn score(target: &str, prediction: &str, use_stemmer: bool) -> Rouge {
    let (t, p) = (
        tokenize(target, use_stemmer),
        tokenize(prediction, use_stemmer),
    );
    Rouge {
        rouge1: ngram_score(&t, &p, 1),
        rouge2: ngram_score(&t, &p, 2),
        rouge_l: lcs_score(&t, &p),
    }
}

/// The mean of each example's scores over `(target, prediction)` pairs.
pub fn corpus(pairs: &[(&str, &str)], use_stemmer: bool) -> Rouge {
    let mut sum = [[0.0f64; 3]; 3];
    for (t, p) in pairs {
        let r = score(t, p, use_stemmer);
        for (acc, s) in sum.iter_mut().zip([r.rouge1, r.rouge2, r.rouge_l]) {
            acc[0] += s.precision;
            acc[1] += s.recall;
            acc[2] += s.fmeasure;
        }
    }
    let n = pairs.len().max(1) as f64;
    let mean = |s: [f64; 3]| Score {
        precision: s[0] / n,
        recall: s[1] / n,
        fmeasure: s[2] / n,
    };
    Rouge {
        rouge1: mean(sum[0]),
        rouge2: mean(sum[1]),
        rouge_l: mean(sum[2]),
    }
}

/// `rouge_score.tokenize.tokenize`: lowercase, split on anything but `[a-z0-9]`, stem tokens
/// longer than 3 characters.
pub fn tokenize(text: &str, use_stemmer: bool) -> Vec<String> {
    // Python's `lower()` maps a few non-ASCII letters to ASCII ones (e.g. the Kelvin sign to
    // `k`, `İ` to `i̇`); `to_lowercase` is Unicode's full mapping, which agrees on them.
    text.to_lowercase()
        .split(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit()))
        .filter(|t| !t.is_empty())
        .map(|t| {
            if use_stemmer && t.len() > 3 {
                porter_stem(t)
            } else {
                t.to_string()
            }
        })
        .collect()
}

/// `_score_ngrams`: clipped n-gram overlap over the prediction's and target's n-gram counts.
fn ngram_score(target: &[String], prediction: &[String], n: usize) -> Score {
    let count = |tokens: &[String]| -> HashMap<Vec<String>, usize> {
        let mut m = HashMap::new();
        for g in tokens.windows(n) {
            *m.entry(g.to_vec()).or_insert(0) += 1;
        }
        m
    };
    let (t, p) = (count(target), count(prediction));
    let overlap: usize = t
        .iter()
        .map(|(g, &c)| c.min(p.get(g).copied().unwrap_or(0)))
        .sum();
    let (t_total, p_total): (usize, usize) = (t.values().sum(), p.values().sum());
    Score::new(
        overlap as f64 / p_total.max(1) as f64,
        overlap as f64 / t_total.max(1) as f64,
    )
}

/// ROUGE-L of tokenized texts (`_score_lcs`): the longest common subsequence over the
/// prediction's and target's lengths.
pub fn lcs_score(target: &[String], prediction: &[String]) -> Score {
    if target.is_empty() || prediction.is_empty() {
        return Score::default();
    }
    let mut row = vec![0usize; prediction.len() + 1];
    for t in target {
        let mut diag = 0;
        for (j, p) in prediction.iter().enumerate() {
            let up = row[j + 1];
            row[j + 1] = if t == p { diag + 1 } else { up.max(row[j]) };
            diag = up;
        }
    }
    let lcs = row[prediction.len()] as f64;
    Score::new(lcs / prediction.len() as f64, lcs / target.len() as f64)
}

/// NLTK's `PorterStemmer().stem(word)` (mode `NLTK_EXTENSIONS`) for a lowercase ASCII word,
/// step for step as `nltk/stem/porter.py` (3.10) writes it.
pub fn porter_stem(word: &str) -> String {
    // NLTK's `pool` of irregular forms.
    const IRREGULAR: [(&str, &str); 16] = [
        ("sky", "sky"),
        ("skies", "sky"),
        ("dying", "die"),
        ("lying", "lie"),
        ("tying", "tie"),
        ("news", "news"),
        ("innings", "inning"),
        ("inning", "inning"),
        ("outings", "outing"),
        ("outing", "outing"),
        ("cannings", "canning"),
        ("canning", "canning"),
        ("howe", "howe"),
        ("proceed", "proceed"),
        ("exceed", "exceed"),
        ("succeed", "succeed"),
    ];
    if let Some((_, s)) = IRREGULAR.iter().find(|(w, _)| *w == word) {
        return s.to_string();
    }
    if word.chars().count() <= 2 || !word.is_ascii() {
        return word.to_string();
    }
    let mut w = word.as_bytes().to_vec();
    w = step1a(w);
    w = step1b(w);
    w = step1c(w);
    w = step2(w);
    w = step3(w);
    w = step4(w);
    w = step5a(w);
    w = step5b(w);
    String::from_utf8(w).unwrap_or_else(|_| word.to_string())
}

type Word = Vec<u8>;

fn is_vowel(c: u8) -> bool {
    matches!(c, b'a' | b'e' | b'i' | b'o' | b'u')
}

/// `_is_consonant`: a `y` after a run of `y`s is a consonant or not by the run's parity.
fn is_consonant(w: &[u8], mut i: usize) -> bool {
    if is_vowel(w[i]) {
        return false;
    }
    if w[i] == b'y' {
        let mut negate = false;
        while i > 0 && w[i] == b'y' {
            negate = !negate;
            i -= 1;
        }
        return is_vowel(w[i]) == negate;
    }
    true
}

/// `_consonant_flags`: a `y` is a consonant at the start or after a vowel-flagged letter.
fn consonant_flags(w: &[u8]) -> Vec<bool> {
    let mut flags: Vec<bool> = Vec::with_capacity(w.len());
    for (i, &c) in w.iter().enumerate() {
        let f = if is_vowel(c) {
            false
        } else if c == b'y' {
            i == 0 || !flags[i - 1]
        } else {
            true
        };
        flags.push(f);
    }
    flags
}

/// `_measure`: the number of vowel-sequence → consonant-sequence transitions ("vc").
fn measure(stem: &[u8]) -> usize {
    let f = consonant_flags(stem);
    f.windows(2).filter(|p| !p[0] && p[1]).count()
}

fn contains_vowel(stem: &[u8]) -> bool {
    !consonant_flags(stem).iter().all(|&c| c)
}

fn ends_double_consonant(w: &[u8]) -> bool {
    w.len() >= 2 && w[w.len() - 1] == w[w.len() - 2] && is_consonant(w, w.len() - 1)
}

fn ends_cvc(w: &[u8]) -> bool {
    let n = w.len();
    (n >= 3
        && is_consonant(w, n - 3)
        && !is_consonant(w, n - 2)
        && is_consonant(w, n - 1)
        && !matches!(w[n - 1], b'w' | b'x' | b'y'))
        || (n == 2 && !is_consonant(w, 0) && is_consonant(w, 1))
}

fn with(stem: &[u8], suffix: &[u8]) -> Word {
    [stem, suffix].concat()
}

/// A condition on the stem left after removing a rule's suffix.
type Cond<'a> = &'a dyn Fn(&[u8]) -> bool;

/// One rule of `_apply_rule_list`: `suffix` (or `None` for `*d`, a double consonant),
/// replacement, condition.
struct Rule<'a>(Option<&'a [u8]>, &'a [u8], Option<Cond<'a>>);

/// `_apply_rule_list`: the first rule whose suffix matches decides (applied or not).
fn apply(w: Word, rules: &[Rule]) -> Word {
    for Rule(suffix, replacement, cond) in rules {
        match suffix {
            None => {
                if ends_double_consonant(&w) {
                    let stem = &w[..w.len() - 2];
                    return if cond.is_none_or(|c| c(stem)) {
                        with(stem, replacement)
                    } else {
                        w
                    };
                }
            }
            Some(s) if w.ends_with(s) => {
                let stem = &w[..w.len() - s.len()];
                return if cond.is_none_or(|c| c(stem)) {
                    with(stem, replacement)
                } else {
                    w
                };
            }
            Some(_) => {}
        }
    }
    w
}

fn positive(stem: &[u8]) -> bool {
    measure(stem) > 0
}

fn step1a(w: Word) -> Word {
    if w.ends_with(b"ies") && w.len() == 4 {
        return with(&w[..w.len() - 3], b"ie");
    }
    apply(
        w,
        &[
            Rule(Some(b"sses"), b"ss", None),
            Rule(Some(b"ies"), b"i", None),
            Rule(Some(b"ss"), b"ss", None),
            Rule(Some(b"s"), b"", None),
        ],
    )
}

fn step1b(w: Word) -> Word {
    if w.ends_with(b"ied") {
        let replacement: &[u8] = if w.len() == 4 { b"ie" } else { b"i" };
        return with(&w[..w.len() - 3], replacement);
    }
    if w.ends_with(b"eed") {
        let stem = &w[..w.len() - 3];
        return if measure(stem) > 0 {
            with(stem, b"ee")
        } else {
            w
        };
    }
    let Some(stem) = [&b"ed"[..], b"ing"].iter().find_map(|s| {
        let stem = w.strip_suffix(*s)?;
        contains_vowel(stem).then(|| stem.to_vec())
    }) else {
        return w;
    };
    let last = [*stem.last().unwrap_or(&b' ')];
    let keep_double = |_: &[u8]| !matches!(last[0], b'l' | b's' | b'z');
    let add_e = |s: &[u8]| measure(s) == 1 && ends_cvc(s);
    apply(
        stem.clone(),
        &[
            Rule(Some(b"at"), b"ate", None),
            Rule(Some(b"bl"), b"ble", None),
            Rule(Some(b"iz"), b"ize", None),
            Rule(None, &last, Some(&keep_double)),
            Rule(Some(b""), b"e", Some(&add_e)),
        ],
    )
}

fn step1c(w: Word) -> Word {
    let cond = |s: &[u8]| s.len() > 1 && is_consonant(s, s.len() - 1);
    apply(w, &[Rule(Some(b"y"), b"i", Some(&cond))])
}

fn step2(w: Word) -> Word {
    if let Some(stem) = w.strip_suffix(b"alli") {
        if positive(stem) {
            return step2(with(stem, b"al"));
        }
    }
    let p: Cond = &positive;
    let logi = |_: &[u8]| positive(&w[..w.len() - 3]);
    let rules = [
        Rule(Some(b"ational"), b"ate", Some(p)),
        Rule(Some(b"tional"), b"tion", Some(p)),
        Rule(Some(b"enci"), b"ence", Some(p)),
        Rule(Some(b"anci"), b"ance", Some(p)),
        Rule(Some(b"izer"), b"ize", Some(p)),
        Rule(Some(b"bli"), b"ble", Some(p)),
        Rule(Some(b"alli"), b"al", Some(p)),
        Rule(Some(b"entli"), b"ent", Some(p)),
        Rule(Some(b"eli"), b"e", Some(p)),
        Rule(Some(b"ousli"), b"ous", Some(p)),
        Rule(Some(b"ization"), b"ize", Some(p)),
        Rule(Some(b"ation"), b"ate", Some(p)),
        Rule(Some(b"ator"), b"ate", Some(p)),
        Rule(Some(b"alism"), b"al", Some(p)),
        Rule(Some(b"iveness"), b"ive", Some(p)),
        Rule(Some(b"fulness"), b"ful", Some(p)),
        Rule(Some(b"ousness"), b"ous", Some(p)),
        Rule(Some(b"aliti"), b"al", Some(p)),
        Rule(Some(b"iviti"), b"ive", Some(p)),
        Rule(Some(b"biliti"), b"ble", Some(p)),
        Rule(Some(b"fulli"), b"ful", Some(p)),
        Rule(Some(b"logi"), b"log", Some(&logi)),
    ];
    apply(w.clone(), &rules)
}

fn step3(w: Word) -> Word {
    let p: Cond = &positive;
    apply(
        w,
        &[
            Rule(Some(b"icate"), b"ic", Some(p)),
            Rule(Some(b"ative"), b"", Some(p)),
            Rule(Some(b"alize"), b"al", Some(p)),
            Rule(Some(b"iciti"), b"ic", Some(p)),
            Rule(Some(b"ical"), b"ic", Some(p)),
            Rule(Some(b"ful"), b"", Some(p)),
            Rule(Some(b"ness"), b"", Some(p)),
        ],
    )
}

fn step4(w: Word) -> Word {
    let gt1 = |s: &[u8]| measure(s) > 1;
    let ion = |s: &[u8]| measure(s) > 1 && matches!(s.last(), Some(b's' | b't'));
    let m: Cond = &gt1;
    let suffixes: [&[u8]; 11] = [
        b"al", b"ance", b"ence", b"er", b"ic", b"able", b"ible", b"ant", b"ement", b"ment", b"ent",
    ];
    let mut rules: Vec<Rule> = suffixes
        .iter()
        .map(|s| Rule(Some(s), b"", Some(m)))
        .collect();
    rules.push(Rule(Some(b"ion"), b"", Some(&ion)));
    for s in [&b"ou"[..], b"ism", b"ate", b"iti", b"ous", b"ive", b"ize"] {
        rules.push(Rule(Some(s), b"", Some(m)));
    }
    apply(w, &rules)
}

fn step5a(w: Word) -> Word {
    if let Some(stem) = w.strip_suffix(b"e") {
        if measure(stem) > 1 || (measure(stem) == 1 && !ends_cvc(stem)) {
            return stem.to_vec();
        }
    }
    w
}

fn step5b(w: Word) -> Word {
    let cond = |_: &[u8]| measure(&w[..w.len() - 1]) > 1;
    apply(w.clone(), &[Rule(Some(b"ll"), b"l", Some(&cond))])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn porter_examples() {
        for (w, s) in [
            ("caresses", "caress"),
            ("ponies", "poni"),
            ("ties", "tie"),
            ("cats", "cat"),
            ("agreed", "agre"),
            ("plastered", "plaster"),
            ("motoring", "motor"),
            ("hopping", "hop"),
            ("filing", "file"),
            ("happy", "happi"),
            ("relational", "relat"),
            ("generously", "gener"),
            ("dying", "die"),
        ] {
            assert_eq!(porter_stem(w), s, "{w}");
        }
    }

    #[test]
    fn lcs_and_ngrams_on_a_small_case() {
        let r = score("the cat sat on the mat", "the cat on the mat sat", false);
        assert_eq!(r.rouge1.fmeasure, 1.0);
        assert!((r.rouge2.precision - 0.6).abs() < 1e-12);
        assert!((r.rouge_l.recall - 5.0 / 6.0).abs() < 1e-12);
        assert_eq!(score("", "x", true), Rouge::default());
    }
}
