//! Session tokens: unguessable values that bind a data connection to one job.
//!
//! They come from the kernel's random generator (`getrandom(2)`, see
//! `drivers/char/random.c`) and nothing else. If it fails, the job fails: a predictable
//! token (time-derived, counter) would let anyone who can reach the data port feed a
//! destination device state it never agreed to, so there is no fallback.

/// Bytes in a session token (128 bits).
pub const SESSION_TOKEN_BYTES: usize = 16;

#[derive(Debug, thiserror::Error)]
#[error("cannot draw a session token from the kernel's random generator (getrandom): {0}")]
pub struct TokenError(getrandom::Error);

/// A fresh 128-bit token; fails closed.
pub fn session_token() -> Result<Vec<u8>, TokenError> {
    let mut token = vec![0u8; SESSION_TOKEN_BYTES];
    getrandom::fill(&mut token).map_err(TokenError)?;
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_full_length_and_differ() {
        let tokens: Vec<Vec<u8>> = (0..64).map(|_| session_token().unwrap()).collect();
        assert!(tokens.iter().all(|t| t.len() == SESSION_TOKEN_BYTES));
        let distinct: std::collections::HashSet<_> = tokens.iter().collect();
        assert_eq!(distinct.len(), tokens.len(), "64 tokens of 128 random bits never repeat");
        assert!(tokens.iter().all(|t| t.iter().any(|&b| b != 0)));
    }
}
