//! Reading a line from a peer that may never end it (a guest's agent, a QEMU gone
//! wrong): at most `limit` bytes are kept. A longer line is read to its end and thrown
//! away without being held, so the next read starts on a fresh line.

use tokio::io::{AsyncBufRead, AsyncBufReadExt};

#[derive(Debug, PartialEq, Eq)]
pub enum LineRead {
    /// A line with its `\n` (or without one, cut by EOF).
    Line(Vec<u8>),
    /// The line was longer than the limit; it was skipped.
    TooLong,
    /// Nothing more to read.
    Eof,
}

pub async fn read_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    limit: usize,
) -> std::io::Result<LineRead> {
    let mut line = Vec::new();
    let mut too_long = false;
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(match (too_long, line.is_empty()) {
                (true, _) => LineRead::TooLong,
                (false, true) => LineRead::Eof,
                (false, false) => LineRead::Line(line),
            });
        }
        let end = available.iter().position(|byte| *byte == b'\n');
        let used = end.map_or(available.len(), |newline| newline + 1);
        if !too_long {
            if line.len() + used > limit {
                too_long = true;
                line = Vec::new();
            } else {
                line.extend_from_slice(&available[..used]);
            }
        }
        reader.consume(used);
        if end.is_some() {
            return Ok(if too_long {
                LineRead::TooLong
            } else {
                LineRead::Line(line)
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_line_over_the_limit_is_skipped_whole_and_the_next_one_is_read() {
        let input = format!("short\n{}\nnext\ntail", "x".repeat(100));
        // A small buffer, so that the long line arrives in many pieces.
        let mut reader = tokio::io::BufReader::with_capacity(8, input.as_bytes());
        assert_eq!(
            read_line(&mut reader, 16).await.unwrap(),
            LineRead::Line(b"short\n".to_vec())
        );
        assert_eq!(read_line(&mut reader, 16).await.unwrap(), LineRead::TooLong);
        assert_eq!(
            read_line(&mut reader, 16).await.unwrap(),
            LineRead::Line(b"next\n".to_vec())
        );
        assert_eq!(
            read_line(&mut reader, 16).await.unwrap(),
            LineRead::Line(b"tail".to_vec())
        );
        assert_eq!(read_line(&mut reader, 16).await.unwrap(), LineRead::Eof);
    }

    #[tokio::test]
    async fn an_endless_line_cut_by_eof_is_too_long_not_a_line() {
        let input = "y".repeat(1000);
        let mut reader = tokio::io::BufReader::with_capacity(8, input.as_bytes());
        assert_eq!(read_line(&mut reader, 16).await.unwrap(), LineRead::TooLong);
    }
}
