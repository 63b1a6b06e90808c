//! Running the model: choosing tokens ([`sampling`]) and the reference
//! single-sequence generation loop ([`generate`]).

pub mod generate;
pub mod sampling;
