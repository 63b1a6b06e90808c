//! Text ↔ token ids, and the chat template that turns a conversation into a prompt.
//!
//! Tokenisation is done by Hugging Face's `tokenizers` crate — the same code
//! `transformers` runs underneath — so a prompt becomes exactly the ids the
//! model was trained on. This wrapper adds what serving needs around it:
//! which ids end a generation, whether a BOS id starts every prompt, and the
//! model's own chat template (a Jinja program shipped with the model, rendered
//! here with `minijinja`).

use std::path::Path;

use minijinja::value::{Serde, Value};
use minijinja::{context, Environment};
use serde::{Deserialize, Serialize};

/// One turn of a conversation (`role` is `system`, `user` or `assistant`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("tokenizer: {0}")]
    Tokenizers(String),
    #[error("this model has no chat template; send a plain prompt instead")]
    NoChatTemplate,
    #[error("the model's chat template failed to render: {0}")]
    Template(String),
}

fn tk_err(e: tokenizers::Error) -> TokenizerError {
    TokenizerError::Tokenizers(e.to_string())
}

/// A tokenizer plus the special ids and chat template that come with a model.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<(u32, String)>,
    eos: Vec<(u32, String)>,
    chat_template: Option<String>,
}

impl Tokenizer {
    /// Wraps a `tokenizers::Tokenizer`. `bos` and `eos` are ids; their text is
    /// looked up in the vocabulary (the chat template needs it).
    pub fn new(
        inner: tokenizers::Tokenizer,
        bos: Option<u32>,
        eos: &[u32],
        chat_template: Option<String>,
    ) -> Self {
        let named = |id: u32| inner.id_to_token(id).map(|text| (id, text));
        let bos = bos.and_then(named);
        let eos = eos.iter().filter_map(|&id| named(id)).collect();
        Tokenizer {
            inner,
            bos,
            eos,
            chat_template,
        }
    }

    /// Reads a `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<tokenizers::Tokenizer, TokenizerError> {
        tokenizers::Tokenizer::from_file(path).map_err(tk_err)
    }

    /// The underlying `tokenizers` object (for saving it as `tokenizer.json`).
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos.as_ref().map(|(id, _)| *id)
    }

    /// Ids that end a generation.
    pub fn eos_ids(&self) -> Vec<u32> {
        self.eos.iter().map(|(id, _)| *id).collect()
    }

    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Text to ids, with the model's own special tokens (a BOS id, for models
    /// whose tokenizer adds one) as its post-processor defines.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        Ok(self
            .inner
            .encode(text, true)
            .map_err(tk_err)?
            .get_ids()
            .to_vec())
    }

    /// Ids to text, leaving special tokens out.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.inner.decode(ids, true).map_err(tk_err)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// An incremental decoder: feed ids one at a time and get text as soon as
    /// it forms whole characters (a multi-byte character may span tokens).
    pub fn stream_decoder(&self) -> StreamDecoder<'_> {
        StreamDecoder {
            tokenizer: self,
            ids: Vec::new(),
            emitted: 0,
        }
    }

    /// Renders a conversation with the model's chat template, ending with the
    /// cue for the assistant's reply (`add_generation_prompt`).
    pub fn apply_chat_template(&self, messages: &[ChatMessage]) -> Result<String, TokenizerError> {
        let template = self
            .chat_template
            .as_deref()
            .ok_or(TokenizerError::NoChatTemplate)?;
        let mut env = Environment::new();
        // Hugging Face templates are written for Python's Jinja: they call
        // str methods such as .strip() and a raise_exception() helper.
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    message,
                ))
            },
        );
        env.add_template("chat", template)
            .map_err(|e| TokenizerError::Template(e.to_string()))?;
        let text =
            |t: &Option<(u32, String)>| t.as_ref().map(|(_, s)| s.clone()).unwrap_or_default();
        env.get_template("chat")
            .and_then(|t| {
                t.render(context! {
                    messages => Value::from(Serde(messages)),
                    add_generation_prompt => true,
                    bos_token => text(&self.bos),
                    eos_token => text(&self.eos.first().cloned()),
                })
            })
            .map_err(|e| TokenizerError::Template(e.to_string()))
    }
}

/// See [`Tokenizer::stream_decoder`].
pub struct StreamDecoder<'a> {
    tokenizer: &'a Tokenizer,
    ids: Vec<u32>,
    emitted: usize,
}

impl StreamDecoder<'_> {
    /// Adds one id; returns the new text it completes, if any.
    ///
    /// Decodes the whole sequence so far and returns what is new: simple and
    /// exact (byte-level BPE can merge across tokens), and cheap next to a
    /// forward pass.
    pub fn push(&mut self, id: u32) -> Result<Option<String>, TokenizerError> {
        self.ids.push(id);
        let text = self.tokenizer.decode(&self.ids)?;
        // A trailing U+FFFD means a multi-byte character is still incomplete.
        if text.ends_with('\u{FFFD}') {
            return Ok(None);
        }
        match text.get(self.emitted..) {
            Some(new) if !new.is_empty() => {
                let new = new.to_string();
                self.emitted = text.len();
                Ok(Some(new))
            }
            _ => Ok(None),
        }
    }
}
