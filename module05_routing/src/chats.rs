//! Multi-turn conversations for live runs: the workload prefix caching is for.
//!
//! Every conversation starts with the same system prompt (a shared prefix
//! every worker can cache), and every turn resends the whole history, so
//! turn `t`'s prompt begins with turn `t-1`'s prompt and reply. A worker
//! that served the previous turn holds all of that; any other worker holds
//! at most the system prompt. The user messages are drawn from fixed
//! phrase lists with a seed, so every run and every policy sees the same
//! conversations.

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use shared::model::tokenizer::ChatMessage;

/// The system prompt all conversations share.
pub const SYSTEM_PROMPT: &str = "You are a patient teaching assistant for a course on \
large language model serving. Answer in short, precise sentences. When a student asks about \
performance, name the resource that limits it (compute, memory bandwidth, memory capacity or \
the network), give an order of magnitude, and suggest one measurement that would confirm it. \
When a student asks about code, explain what the code does before suggesting changes. \
Never invent numbers; say which assumption each estimate rests on.";

const TOPICS: &[&str] = &[
    "the KV cache of a 7B model",
    "continuous batching",
    "prefill on a separate GPU",
    "RDMA writes between nodes",
    "paged attention blocks",
    "prefix caching for chat",
    "the time to first token",
    "decode throughput at batch 64",
    "moving KV caches over TCP",
    "a router that knows cache contents",
    "grouped-query attention",
    "quantising the KV cache to int8",
];

const QUESTIONS: &[&str] = &[
    "How much memory does it need for a 4096-token prompt, and why?",
    "What limits its speed on a single GPU, and how would I measure that?",
    "Which numbers should I put in a table to compare it with the baseline?",
    "What goes wrong when many users send long prompts at the same time?",
    "How does it change when the model is twice as large?",
    "Can you give me a back-of-the-envelope estimate and list its assumptions?",
    "What would a good first experiment be, and what result would surprise you?",
    "How would I explain it to a colleague who knows databases but not GPUs?",
];

const FOLLOW_UPS: &[&str] = &[
    "Thanks. Now compare that with the network cost of sending it to another node.",
    "Could you redo the estimate for a batch of 32 requests instead of one?",
    "Which of those numbers would change on a laptop without a GPU?",
    "What if the link were ten times slower, at 10 Gbit/s?",
    "Summarise that in three bullet points I can put on a slide.",
    "Which part of that did you assume rather than derive?",
];

/// One conversation: a session id and the user's messages, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatScript {
    pub session: u64,
    pub user_turns: Vec<String>,
}

/// `sessions` conversations of `turns` user messages each, from `seed`.
pub fn chat_scripts(sessions: usize, turns: usize, seed: u64) -> Vec<ChatScript> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..sessions)
        .map(|session| {
            let topic = TOPICS.choose(&mut rng).expect("non-empty");
            let question = QUESTIONS.choose(&mut rng).expect("non-empty");
            let mut user_turns = vec![format!("I am studying {topic}. {question}")];
            while user_turns.len() < turns {
                user_turns.push(FOLLOW_UPS.choose(&mut rng).expect("non-empty").to_string());
            }
            ChatScript {
                session: session as u64,
                user_turns,
            }
        })
        .collect()
}

/// A conversation so far: the system prompt, then alternating user and
/// assistant messages.
#[derive(Debug, Clone)]
pub struct Conversation {
    pub messages: Vec<ChatMessage>,
}

impl Conversation {
    pub fn new() -> Self {
        Conversation {
            messages: vec![ChatMessage::new("system", SYSTEM_PROMPT)],
        }
    }

    pub fn user(&mut self, text: &str) {
        self.messages.push(ChatMessage::new("user", text));
    }

    pub fn assistant(&mut self, text: &str) {
        self.messages.push(ChatMessage::new("assistant", text));
    }
}

impl Default for Conversation {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_are_reproducible_and_have_the_turns_asked_for() {
        let a = chat_scripts(5, 3, 7);
        assert_eq!(a, chat_scripts(5, 3, 7));
        assert_ne!(a, chat_scripts(5, 3, 8));
        assert!(a.iter().all(|s| s.user_turns.len() == 3));
        assert_eq!(
            a.iter().map(|s| s.session).collect::<Vec<_>>(),
            [0, 1, 2, 3, 4]
        );
    }
}
