//! Training data: a byte-level BPE tokenizer trained on the corpus with the `tokenizers` crate,
//! the corpus as one token stream split into training and validation parts, and random windows.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rand::Rng;
use rand::rngs::StdRng;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

/// The end-of-text token, appended after each corpus file.
pub const EOS: &str = "<|endoftext|>";

/// Trains a byte-level BPE of `vocab` entries (the EOS token included) on the corpus files.
pub fn train_tokenizer(corpus: &[PathBuf], vocab: usize) -> Result<Tokenizer> {
    let alphabet = ByteLevel::alphabet().into_iter().collect();
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(vocab)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(vec![AddedToken::from(EOS, true)])
        .initial_alphabet(alphabet)
        .build()
        .into();
    let mut tokenizer = Tokenizer::new(BPE::default());
    tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    let files = corpus.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    tokenizer.train_from_files(&mut trainer, files).map_err(|e| anyhow::anyhow!("training the tokenizer: {e}"))?;
    Ok(tokenizer)
}

/// The corpus as token ids, each file followed by EOS, in chunks of lines so that encoding
/// stays fast.
pub fn encode_corpus(tokenizer: &Tokenizer, corpus: &[PathBuf]) -> Result<Vec<u32>> {
    let eos = tokenizer.token_to_id(EOS).context("the tokenizer has no <|endoftext|>")?;
    let mut ids = Vec::new();
    for path in corpus {
        let text = std::fs::read_to_string(path).with_context(|| format!("--corpus {}", path.display()))?;
        let lines: Vec<&str> = text.split_inclusive('\n').collect();
        let chunks: Vec<String> = lines.chunks(64).map(|c| c.concat()).collect();
        let encodings =
            tokenizer.encode_batch(chunks, false).map_err(|e| anyhow::anyhow!("{}: encoding: {e}", path.display()))?;
        for e in encodings {
            ids.extend_from_slice(e.get_ids());
        }
        ids.push(eos);
    }
    Ok(ids)
}

/// Training and validation token streams (the last `val_share` of the corpus is validation).
pub struct Corpus {
    pub train: Vec<u32>,
    pub val: Vec<u32>,
}

impl Corpus {
    pub fn split(ids: Vec<u32>, val_share: f64, window: usize) -> Result<Self> {
        let cut = ((ids.len() as f64) * (1.0 - val_share)) as usize;
        if cut < 4 * window || ids.len() - cut < 2 * window {
            anyhow::bail!("--corpus: {} tokens is too little for windows of {window}", ids.len());
        }
        Ok(Self { val: ids[cut..].to_vec(), train: ids[..cut].to_vec() })
    }

    /// `batch` random windows of `window` tokens from the training part, concatenated.
    pub fn train_batch(&self, rng: &mut StdRng, batch: usize, window: usize) -> Vec<u32> {
        (0..batch)
            .flat_map(|_| {
                let start = rng.random_range(0..self.train.len() - window);
                self.train[start..start + window].iter().copied()
            })
            .collect()
    }

    /// The `i`-th of the fixed validation batches (consecutive windows), or None past the end.
    pub fn val_batch(&self, i: usize, batch: usize, window: usize) -> Option<Vec<u32>> {
        let start = i * batch * window;
        (start + batch * window <= self.val.len()).then(|| self.val[start..start + batch * window].to_vec())
    }
}

/// Writes tokenizer.json and a tokenizer_config.json naming the EOS token.
pub fn save_tokenizer(tokenizer: &Tokenizer, out: &Path) -> Result<()> {
    let path = out.join("tokenizer.json");
    tokenizer.save(&path, false).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let config = serde_json::json!({ "eos_token": EOS, "bos_token": null, "model_max_length": 1024 });
    std::fs::write(out.join("tokenizer_config.json"), serde_json::to_string_pretty(&config)?)?;
    Ok(())
}
