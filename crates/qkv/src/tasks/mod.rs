//! The three tasks users train: translation ([`translate`]), text classification
//! ([`classify`]) and language modelling ([`lm`]). Each turns text into model batches and model
//! outputs back into text or scores; none touches the terminal.

pub mod classify;
pub mod copy;
pub mod lm;
pub mod translate;
