//! Language modelling: a token stream cut into contiguous blocks, perplexity and bits per
//! character on held-out text, and generation from a prompt.

use super::{tokenizer_for, Prepared, Report, Task};
use crate::backend::Backend;
use crate::data::{read_text, LmBatch, Tokenizer};
use crate::decode::{generate, Choice};
use crate::error::{Error, Result};
use crate::job::Job;
use crate::metrics::bits_per_char;
use crate::model::{Decoding, LanguageModel, Mode, Model, ModelConfig};
use crate::model_dir::{ModelFiles, TOKENIZER_FILE};
use crate::rng::{hash, Rng};
use crate::train::{loss_tally, Observer, Part, Tally, TrainData};
use std::fmt;
use std::path::Path;

/// A text as one token stream, starting with EOS (the document separator, also what generation
/// starts from).
#[derive(Clone, Debug, Default)]
pub struct TokenStream {
    pub ids: Vec<u32>,
    /// Characters of the text, for bits per character.
    pub chars: usize,
}

/// Tokenize line by line (keeping the newlines, which carry a play's layout).
pub fn encode_text(tok: &Tokenizer, text: &str) -> Result<TokenStream> {
    let mut ids = vec![tok.eos];
    for line in text.split_inclusive('\n') {
        ids.extend(tok.encode(line)?);
    }
    Ok(TokenStream {
        ids,
        chars: text.chars().count(),
    })
}

impl TokenStream {
    /// Non-overlapping blocks of `len + 1` tokens (input and shifted target).
    fn blocks(&self, len: usize) -> Vec<&[u32]> {
        let n = self.ids.len().saturating_sub(1) / len.max(1);
        (0..n)
            .map(|i| &self.ids[i * len..i * len + len + 1])
            .collect()
    }

    /// Why the stream holds not one whole block of `len + 1` tokens, if it does not.
    fn too_short(&self, len: usize) -> Option<String> {
        (self.ids.len() < len + 2).then(|| {
            format!(
                "the text has {} tokens, fewer than one block of {} (lower max_len)",
                self.ids.len(),
                len + 1
            )
        })
    }

    /// An [`Error::File`] naming `path` when the stream, read from it, holds not one block.
    pub fn one_block(&self, len: usize, path: &Path) -> Result<()> {
        match self.too_short(len) {
            Some(msg) => Err(Error::File {
                path: path.to_path_buf(),
                msg,
            }),
            None => Ok(()),
        }
    }

    /// An epoch's batches of `max_tokens / len` blocks, block order shuffled by (seed, epoch).
    /// Each epoch shifts the block boundaries by an offset, so positions see varied contexts.
    pub fn epoch_batches(
        &self,
        len: usize,
        max_tokens: usize,
        seed: u64,
        epoch: u64,
    ) -> Result<Vec<LmBatch>> {
        if len == 0 {
            return Err(Error::Config(
                "language-model blocks need max_len >= 2".into(),
            ));
        }
        if let Some(msg) = self.too_short(len) {
            return Err(Error::Config(msg));
        }
        let mut rng = Rng::new(hash(seed, epoch));
        // Never so far that not one whole block is left.
        let max_offset = len.min(self.ids.len() - 1 - len);
        let offset = if seed == 0 && epoch == 0 {
            0
        } else {
            rng.below(max_offset as u64 + 1) as usize
        };
        let shifted = TokenStream {
            ids: self.ids[offset..].to_vec(),
            chars: 0,
        };
        let mut blocks = shifted.blocks(len);
        for i in (1..blocks.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            blocks.swap(i, j);
        }
        let per_batch = (max_tokens / len).max(1);
        Ok(blocks.chunks(per_batch).map(LmBatch::new).collect())
    }
}

/// Each prompt as generation starts from it: EOS (the document separator), then its tokens.
/// A prompt that leaves no room for one new token is an [`Error::InputTooLong`] naming it.
pub fn encode_prompts(
    tok: &Tokenizer,
    prompts: &[String],
    max_len: usize,
) -> Result<Vec<Vec<u32>>> {
    let limit = max_len.saturating_sub(2);
    let mut out = Vec::with_capacity(prompts.len());
    for (index, p) in prompts.iter().enumerate() {
        let ids = tok.encode(p)?;
        if ids.len() > limit {
            return Err(Error::InputTooLong {
                index,
                len: ids.len(),
                limit,
            });
        }
        out.push([&[tok.eos][..], &ids].concat());
    }
    Ok(out)
}

/// Continue encoded prompts (from [`encode_prompts`]): at most `max_new` tokens each,
/// stopping at EOS, each chosen by its own `choices[i]` (or `choices[0]` for all). Returns
/// the new tokens of each.
pub fn complete_ids<B: Decoding>(
    model: &mut LanguageModel<B>,
    prefixes: &[Vec<u32>],
    eos: u32,
    max_new: usize,
    choices: &[Choice],
) -> Result<Vec<Vec<u32>>> {
    let longest = prefixes.iter().map(|p| p.len()).max().unwrap_or(1);
    if longest >= model.config.max_len {
        return Err(Error::SequenceTooLong {
            input: "prompt",
            len: longest,
            max_len: model.config.max_len,
        });
    }
    let mut cache = model.start_decoding(prefixes.len(), longest.saturating_add(max_new));
    let mut out = generate(model, &mut cache, prefixes, eos, choices)?;
    out.iter_mut().for_each(|o| o.truncate(max_new));
    Ok(out)
}

/// Prompt and continuation as one text: subword decoders join pieces across the boundary
/// (e.g. the space before a word-initial piece), so they are decoded together.
pub fn decode_completion(tok: &Tokenizer, prefix: &[u32], new: &[u32]) -> Result<String> {
    tok.decode(&[prefix, new].concat())
}

/// Continue each prompt; returns prompt and continuation as one text. A prompt that leaves
/// no room in the model's context is an error naming it.
pub fn complete<B: Decoding>(
    model: &mut LanguageModel<B>,
    tok: &Tokenizer,
    prompts: &[String],
    max_new: usize,
    choices: &[Choice],
) -> Result<Vec<String>> {
    let prefixes = encode_prompts(tok, prompts, model.config.max_len)?;
    let out = complete_ids(model, &prefixes, tok.eos, max_new, choices)?;
    prefixes
        .iter()
        .zip(&out)
        .map(|(p, o)| decode_completion(tok, p, o))
        .collect()
}

/// Perplexity and bits per character of a model on a text (and samples from it).
#[derive(Clone, Debug)]
pub struct LmReport {
    pub tokens: usize,
    pub loss: f64,
    pub bits_per_char: f64,
    pub samples: Vec<String>,
}

impl fmt::Display for LmReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} tokens: loss {:.4} nats/token, perplexity {:.2}, bits per character {:.4}",
            self.tokens,
            self.loss,
            self.loss.exp(),
            self.bits_per_char
        )?;
        for (i, text) in self.samples.iter().enumerate() {
            write!(f, "\n\nsample {}:\n{text}", i + 1)?;
        }
        Ok(())
    }
}

/// Score `model` on `text`: non-overlapping blocks of its context length.
pub fn evaluate<B: Backend>(
    model: &mut LanguageModel<B>,
    tok: &Tokenizer,
    text: &str,
    path: &Path,
    max_tokens: usize,
) -> Result<LmReport> {
    let stream = encode_text(tok, text)?;
    stream.one_block(model.config.max_len - 1, path)?;
    evaluate_stream(model, &stream, max_tokens)
}

/// [`evaluate`] on a text already encoded (and checked to hold a block).
fn evaluate_stream<B: Backend>(
    model: &mut LanguageModel<B>,
    stream: &TokenStream,
    max_tokens: usize,
) -> Result<LmReport> {
    let batches = stream.epoch_batches(model.config.max_len - 1, max_tokens, 0, 0)?;
    let (mut sum, mut n) = (0.0, 0usize);
    for b in &batches {
        let loss = model.forward(b, Mode::EVAL)?.loss;
        sum += loss.nll_sum;
        n += loss.count;
    }
    // Bits per character over the characters the scored tokens cover (whole blocks only).
    let covered = stream.chars as f64 * n as f64 / stream.ids.len().max(1) as f64;
    Ok(LmReport {
        tokens: n,
        loss: sum / n.max(1) as f64,
        bits_per_char: bits_per_char(sum, covered.round() as usize),
        samples: Vec::new(),
    })
}

/// The language-modelling task of a job: the training text's token stream, validation
/// batches, the test text.
pub struct Lm {
    train: TokenStream,
    valid: Vec<LmBatch>,
    test: Option<TokenStream>,
    block: usize,
    max_tokens: usize,
    seed: u64,
}

impl<B: Backend> TrainData<LanguageModel<B>, B> for Lm {
    fn epoch(&self, epoch: u64) -> Result<Vec<LmBatch>> {
        self.train
            .epoch_batches(self.block, self.max_tokens, self.seed, epoch)
    }

    fn validate(&mut self, model: &mut LanguageModel<B>, part: Part) -> Result<Tally> {
        loss_tally(model, &self.valid, part)
    }
}

impl Task for Lm {
    type Model = LanguageModel;

    fn prepare(job: &Job, run: &Path, observer: &mut dyn Observer) -> Result<Prepared<Self>> {
        let train_text = read_text(&job.data.train)?;
        let valid_text = read_text(&job.data.valid)?;
        let test = job.data.test.as_deref().map(read_text).transpose()?;
        let lines = || {
            train_text
                .split_inclusive('\n')
                .map(str::to_string)
                .collect::<Vec<_>>()
                .into_iter()
        };
        let tok = tokenizer_for(job, run, TOKENIZER_FILE, lines, observer)?;
        let config = job.model_config(None, tok.vocab_size(), tok.pad, 0)?;
        let train = encode_text(&tok, &train_text)?;
        let valid = encode_text(&tok, &valid_text)?;
        let block = config.max_len - 1;
        let max_tokens = job.train.max_tokens;
        // Surface a text too short for one block now, not at the first epoch.
        train.one_block(block, &job.data.train)?;
        valid.one_block(block, &job.data.valid)?;
        let test = match (test, job.data.test.as_deref()) {
            (Some(text), Some(path)) => {
                let stream = encode_text(&tok, &text)?;
                stream.one_block(block, path)?;
                Some(stream)
            }
            _ => None,
        };
        train.epoch_batches(block, max_tokens, job.train.seed, 0)?; // max_len 1: no block
        observer.on_message(&format!(
            "train: {} tokens, valid: {} tokens, blocks of {block}, vocabulary {}",
            train.ids.len(),
            valid.ids.len(),
            tok.vocab_size()
        ));
        let task = Lm {
            valid: valid.epoch_batches(block, max_tokens, 0, 0)?,
            train,
            test,
            block,
            max_tokens,
            seed: job.train.seed,
        };
        let files = ModelFiles {
            tokenizer: tok,
            target_tokenizer: None,
            labels: None,
            decode: job.decode.clone(),
            task: None,
        };
        Ok(Prepared {
            task,
            files,
            config,
        })
    }

    fn new_model(&self, config: ModelConfig, job: &Job) -> Result<LanguageModel> {
        LanguageModel::new(config, job.train.seed)
    }

    /// Perplexity on the test text, and `job.samples` generations from an empty prompt.
    fn test(
        &mut self,
        model: &mut LanguageModel,
        files: &ModelFiles,
        job: &Job,
    ) -> Result<Option<Report>> {
        let Some(stream) = &self.test else {
            return Ok(None);
        };
        let tok = &files.tokenizer;
        let mut report = evaluate_stream(model, stream, self.max_tokens)?;
        let prompts = vec![String::new(); job.samples];
        let max_new = files.decode.max_new_tokens.min(model.config.max_len - 1);
        // Sample i uses seed + i, so the samples differ from each other.
        let choices: Vec<Choice> = (0..job.samples as u64)
            .map(|i| Choice::Sample(files.decode.sampling(job.train.seed.wrapping_add(i))))
            .collect();
        if !choices.is_empty() {
            report.samples = complete(model, tok, &prompts, max_new, &choices)?;
        }
        Ok(Some(Report::Lm(report)))
    }
}
