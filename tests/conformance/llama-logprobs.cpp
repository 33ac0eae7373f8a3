// llama.cpp's side of the conformance test (tests/conformance/run.sh builds this against the
// libllama of tests/bench/build-llamacpp.sh). For a model and some text files it prints, as one
// JSON object per line:
//   {"file": NAME, "tokens": [...], "top": [[[id, logprob], ...], ...]}
//     the file's tokens as llama.cpp tokenizes them (BOS if the vocabulary adds one; at most
//     --max-tokens), one batch with logits for every position, and at each position the
//     --top-k most likely next tokens with their log-probabilities (log-softmax in double);
//   {"greedy": NAME, "prompt": [...], "tokens": [...]}
//     with --greedy N: from the first --prompt-tokens tokens of the file, N tokens by argmax,
//     one token per decode call (the way a completion engine decodes).
// Defaults are llama.cpp's own (context parameters, f16 K/V cache, flash attention "auto").
//
//   llama-logprobs MODEL.gguf --max-tokens 256 --top-k 8 --greedy 64 --prompt-tokens 48 FILE...
#include "llama.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

static void die(const std::string & msg) {
    fprintf(stderr, "llama-logprobs: %s\n", msg.c_str());
    exit(1);
}

static std::string json_str(const std::string & s) {
    std::string out = "\"";
    for (unsigned char c : s) {
        if (c == '"' || c == '\\') { out += '\\'; out += (char) c; }
        else if (c < 0x20) { char b[8]; snprintf(b, sizeof b, "\\u%04x", c); out += b; }
        else out += (char) c;
    }
    return out + "\"";
}

static std::string json_ids(const std::vector<llama_token> & v) {
    std::string out = "[";
    for (size_t i = 0; i < v.size(); i++) out += (i ? "," : "") + std::to_string(v[i]);
    return out + "]";
}

static void quiet_log(enum ggml_log_level level, const char * text, void *) {
    if (level >= GGML_LOG_LEVEL_ERROR) fputs(text, stderr);
}

static llama_token argmax(const float * logits, int n_vocab) {
    return (llama_token) (std::max_element(logits, logits + n_vocab) - logits);
}

int main(int argc, char ** argv) {
    std::string model_path;
    int max_tokens = 256, top_k = 8, greedy = 0, prompt_tokens = 48, threads = 2;
    std::vector<std::string> files;
    for (int i = 1; i < argc; i++) {
        std::string a = argv[i];
        auto next = [&]() -> int {
            if (i + 1 >= argc) die("missing value after " + a);
            return atoi(argv[++i]);
        };
        if (a == "--max-tokens") max_tokens = next();
        else if (a == "--top-k") top_k = next();
        else if (a == "--greedy") greedy = next();
        else if (a == "--prompt-tokens") prompt_tokens = next();
        else if (a == "--threads") threads = next();
        else if (model_path.empty()) model_path = a;
        else files.push_back(a);
    }
    if (model_path.empty() || files.empty()) die("usage: llama-logprobs MODEL.gguf [options] FILE...");

    llama_log_set(quiet_log, nullptr);
    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    mp.progress_callback = [](float, void *) { return true; };  // no progress dots
    llama_model * model = llama_model_load_from_file(model_path.c_str(), mp);
    if (!model) die("cannot load " + model_path);
    const llama_vocab * vocab = llama_model_get_vocab(model);
    const int n_vocab = llama_vocab_n_tokens(vocab);

    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = std::max(max_tokens, prompt_tokens + greedy) + 16;
    cp.n_batch = cp.n_ctx;
    cp.n_ubatch = cp.n_ctx;
    cp.n_threads = threads;
    cp.n_threads_batch = threads;
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) die("cannot create a context");

    for (const std::string & path : files) {
        std::ifstream in(path, std::ios::binary);
        if (!in) die("cannot read " + path);
        std::stringstream ss;
        ss << in.rdbuf();
        const std::string text = ss.str();
        std::vector<llama_token> toks(text.size() + 16);
        int n = llama_tokenize(vocab, text.data(), (int32_t) text.size(), toks.data(), (int32_t) toks.size(), true, false);
        if (n < 0) die("tokenization failed for " + path);
        toks.resize(std::min(n, max_tokens));
        std::string name = path.substr(path.find_last_of('/') + 1);

        // Every position's logits from one batch.
        llama_memory_clear(llama_get_memory(ctx), true);
        llama_batch batch = llama_batch_init((int32_t) toks.size(), 0, 1);
        for (size_t i = 0; i < toks.size(); i++) {
            batch.token[i] = toks[i];
            batch.pos[i] = (llama_pos) i;
            batch.n_seq_id[i] = 1;
            batch.seq_id[i][0] = 0;
            batch.logits[i] = 1;
        }
        batch.n_tokens = (int32_t) toks.size();
        if (llama_decode(ctx, batch) != 0) die("decode failed for " + path);
        std::string out = "{\"file\":" + json_str(name) + ",\"tokens\":" + json_ids(toks) + ",\"top\":[";
        std::vector<int> idx(n_vocab);
        for (size_t i = 0; i < toks.size(); i++) {
            const float * lg = llama_get_logits_ith(ctx, (int32_t) i);
            double mx = *std::max_element(lg, lg + n_vocab), sum = 0;
            for (int v = 0; v < n_vocab; v++) sum += std::exp((double) lg[v] - mx);
            const double lse = mx + std::log(sum);
            for (int v = 0; v < n_vocab; v++) idx[v] = v;
            std::partial_sort(idx.begin(), idx.begin() + top_k, idx.end(), [&](int a, int b) { return lg[a] > lg[b]; });
            out += i ? ",[" : "[";
            for (int k = 0; k < top_k; k++) {
                char b[64];
                snprintf(b, sizeof b, "%s[%d,%.6f]", k ? "," : "", idx[k], (double) lg[idx[k]] - lse);
                out += b;
            }
            out += "]";
        }
        out += "]}";
        puts(out.c_str());
        llama_batch_free(batch);

        if (greedy > 0) {
            // The prompt in one batch, then one token per decode.
            std::vector<llama_token> prompt(toks.begin(), toks.begin() + std::min<size_t>(prompt_tokens, toks.size()));
            llama_memory_clear(llama_get_memory(ctx), true);
            llama_batch pb = llama_batch_get_one(prompt.data(), (int32_t) prompt.size());
            if (llama_decode(ctx, pb) != 0) die("prompt decode failed for " + path);
            std::vector<llama_token> gen;
            llama_token t = argmax(llama_get_logits_ith(ctx, -1), n_vocab);
            for (int g = 0; g < greedy; g++) {
                gen.push_back(t);
                if (g + 1 == greedy) break;
                llama_batch one = llama_batch_get_one(&t, 1);
                if (llama_decode(ctx, one) != 0) die("decode failed while generating");
                t = argmax(llama_get_logits_ith(ctx, -1), n_vocab);
            }
            puts(("{\"greedy\":" + json_str(name) + ",\"prompt\":" + json_ids(prompt) + ",\"tokens\":" + json_ids(gen) + "}").c_str());
        }
        fflush(stdout);
    }
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
