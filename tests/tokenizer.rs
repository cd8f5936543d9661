//! Tokenization and chat templates against transformers' own output for the fixtures.

use ferry_runtime::chat::ChatTokenizer;

use crate::support::{FAMILIES, fixture, reference};

#[test]
fn tokenizer_ids_match_transformers() {
    for family in FAMILIES {
        let reference = reference(family);
        let tokenizer = ChatTokenizer::open(&fixture(family)).unwrap();
        for case in &reference.tokenization {
            assert_eq!(tokenizer.encode(&case.text, true).unwrap(), case.ids, "{family}: {:?}", case.text);
        }
    }
}

#[test]
fn chat_template_renders_as_transformers_does() {
    for family in FAMILIES {
        let reference = reference(family);
        let tokenizer = ChatTokenizer::open(&fixture(family)).unwrap();
        let rendered = tokenizer.render(&reference.chat.messages, true).unwrap();
        assert_eq!(rendered, reference.chat.rendered, "{family}");
        assert_eq!(tokenizer.encode_chat(&reference.chat.messages).unwrap(), reference.chat.ids, "{family}");
    }
}
