//! From text files to batches: tokenization ([`tokenizer`]), line-oriented readers with
//! file:line errors ([`text`]) and token-budget batching with length buckets ([`batch`]).

pub mod batch;
pub mod text;
pub mod tokenizer;

pub use batch::{batches_by_tokens, ClassifyBatch, LmBatch, Rows, Seq2SeqBatch};
pub use text::{read_labelled, read_parallel, read_text, Lines};
pub use tokenizer::Tokenizer;
