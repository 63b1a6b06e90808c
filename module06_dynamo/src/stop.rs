//! Stop sequences on a stream of text pieces.
//!
//! A stop string can straddle tokens (`"\n\n"` arriving as `"\n"`, `"\n"`),
//! so text is released only once it can no longer be the start of a stop
//! string: the last `longest stop − 1` bytes are held back until the next
//! piece decides. When a stop string appears, the text before it is the
//! last thing released, and generation ends — the stop string itself is not
//! part of the output, as in the OpenAI API.

/// Scans generated text for stop strings.
#[derive(Debug, Clone)]
pub struct StopScanner {
    stops: Vec<String>,
    hold_back: usize,
    text: String,
    released: usize,
}

/// What one piece of text produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scanned {
    /// Text safe to send now (may be empty).
    pub release: String,
    /// A stop string matched: send `release`, then end.
    pub stopped: bool,
}

impl StopScanner {
    pub fn new(stops: Vec<String>) -> Self {
        let hold_back = stops.iter().map(|s| s.len()).max().unwrap_or(1) - 1;
        StopScanner {
            stops,
            hold_back,
            text: String::new(),
            released: 0,
        }
    }

    pub fn push(&mut self, piece: &str) -> Scanned {
        // A match can only start in text not yet released.
        let search_from = floor_char_boundary(&self.text, self.released);
        self.text.push_str(piece);
        let found = self
            .stops
            .iter()
            .filter_map(|s| self.text[search_from..].find(s.as_str()))
            .min();
        if let Some(offset) = found {
            let end = search_from + offset;
            let release = self.text[self.released..end].to_string();
            self.released = end;
            return Scanned {
                release,
                stopped: true,
            };
        }
        let safe = floor_char_boundary(&self.text, self.text.len().saturating_sub(self.hold_back))
            .max(self.released);
        let release = self.text[self.released..safe].to_string();
        self.released = safe;
        Scanned {
            release,
            stopped: false,
        }
    }

    /// What is still held back, at the end of generation.
    pub fn finish(&mut self) -> String {
        let rest = self.text[self.released..].to_string();
        self.released = self.text.len();
        rest
    }
}

/// The largest char boundary of `s` at or below `i`.
fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut scanner = StopScanner::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for piece in pieces {
            let scanned = scanner.push(piece);
            out += &scanned.release;
            if scanned.stopped {
                return (out, true);
            }
        }
        out += &scanner.finish();
        (out, false)
    }

    #[test]
    fn no_stops_releases_everything_at_once() {
        let mut scanner = StopScanner::new(vec![]);
        assert_eq!(scanner.push("abc").release, "abc");
    }

    #[test]
    fn a_stop_string_split_across_pieces_is_found_and_cut() {
        assert_eq!(
            run(&["\n\n"], &["Hello", "\n", "\nWorld"]),
            ("Hello".into(), true)
        );
        assert_eq!(
            run(&["END"], &["a", "E", "N", "D", "b"]),
            ("a".into(), true)
        );
    }

    #[test]
    fn near_misses_are_released_in_full() {
        assert_eq!(run(&["END"], &["a", "EN", "x"]), ("aENx".into(), false));
    }

    #[test]
    fn the_earliest_of_several_stops_wins_and_multibyte_text_survives() {
        assert_eq!(run(&["ß!", "b"], &["é", "ab", "ß!"]), ("éa".into(), true));
        assert_eq!(run(&["!!!"], &["ééé", "ü"]), ("éééü".into(), false));
    }
}
