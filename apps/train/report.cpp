#include "report.hpp"
#include "text.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>

namespace bnorm::train {

namespace fs = std::filesystem;

namespace {

std::string cpu_name() {
  std::ifstream in("/proc/cpuinfo");
  for (std::string line; std::getline(in, line);)
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  return "unknown CPU";
}

std::string isa() {
  const char* e = std::getenv("BNORM_ISA");
  return e && *e ? cat("BNORM_ISA=", e) : std::string("the default kernels (BNORM_ISA unset)");
}

std::string verdict_text(const Judged& j) {
  switch (j.state) {
    case Judged::not_run: return "inconclusive at this budget (not run; scripts/demo --full)";
    case Judged::pending: return cat("pending (", j.finished, " of ", j.needed, " runs finished)");
    default: break;
  }
  const std::string v = stats::to_string(j.row.verdict);
  // "inconclusive at this budget (one depth)"; any other note goes in parentheses.
  if (j.row.note.rfind("at this budget", 0) == 0 && j.row.verdict == stats::Verdict::inconclusive)
    return cat("inconclusive ", j.row.note);
  return cat(j.row.verdict == stats::Verdict::inconclusive ? v : cat("**", v, "**"),
             j.row.note.empty() ? "" : cat(" (", j.row.note, ")"));
}

void write_runs_csv(const fs::path& dir, const Results& results) {
  std::ostringstream csv;
  csv << "run,net,variant,optimizer,lr,init,seed,bias,dropout,input,subset,epochs,patience,steps,val_accuracy,"
         "test_accuracy,test_loss,train_accuracy,steps_to_loss,steps_to_val,diverged_at,bias_grad_ratio,ms_per_step,"
         "initial_sum_abs_w";
  // --precise-bn's column only where a run has it, so that the other designs' files are as they were.
  const bool precise = std::any_of(results.all().begin(), results.all().end(),
                                   [](const RunResult& r) { return r.precise_test_acc.has_value(); });
  csv << (precise ? ",precise_test_accuracy\n" : "\n");
  auto opt = [](const std::optional<std::int64_t>& o) { return o ? std::to_string(*o) : std::string(); };
  for (const auto& r : results.all()) {
    const RunSpec& s = r.spec;
    csv << s.key() << ',' << s.net_name() << ',' << s.variant << ',' << s.optimizer << ',' << s.lr << ',' << s.init << ','
        << s.seed << ',' << s.bias << ',' << s.dropout << ',' << (s.raw_input ? "raw" : "std") << ',' << s.subset << ','
        << s.epochs << ',' << s.patience << ',' << r.steps << ',' << fmt("%.4f", r.val_acc) << ','
        << fmt("%.4f", r.test_acc) << ',' << fmt("%.4f", r.test_loss) << ',' << fmt("%.4f", r.train_acc) << ','
        << opt(r.steps_to_loss) << ',' << opt(r.steps_to_val) << ',' << opt(r.diverged_at) << ','
        << fmt("%.3g", r.bias_grad) << ',' << fmt("%.2f", r.sec_per_step * 1e3) << ',' << fmt("%.6f", r.init_checksum);
    if (precise) csv << ',' << (r.precise_test_acc ? fmt("%.4f", *r.precise_test_acc) : std::string());
    csv << '\n';
  }
  replace_file(dir / "runs.csv", csv.str());
}

std::string style(const std::string& v) {
  if (v == "none") return "lc rgb 'black'";
  if (v == "bn_before") return "lc rgb '#1f77b4'";
  if (v == "bn_after") return "lc rgb '#d62728'";
  if (v == "torch_bn") return "lc rgb '#ff7f0e'";
  return "lc rgb '#17becf'";
}

// Runs gnuplot on `gp`; a missing gnuplot is a warning (the script stays for later).
void run_gnuplot(const fs::path& dir, const std::string& gp, const std::vector<std::string>& pngs) {
  const fs::path script = dir / "plot.gp", log = dir / "gnuplot.log";
  replace_file(script, gp);
  const std::string cmd = cat("command -v gnuplot >/dev/null 2>&1 && cd '", dir.string(), "' && gnuplot plot.gp >gnuplot.log 2>&1");
  if (std::system(cmd.c_str()) != 0) {
    std::cerr << "bnorm-train: warning: gnuplot failed or is missing (install gnuplot-nox; see " << log.string()
              << "); the plot script is " << script.string() << "\n";
    return;
  }
  for (const auto& png : pngs) {
    std::error_code ec;
    if (!fs::exists(dir / png, ec) || fs::file_size(dir / png, ec) == 0)
      std::cerr << "bnorm-train: warning: gnuplot did not write " << png << " (see " << log.string() << ")\n";
  }
}

// plot_lr.png: the trainable range, every seed's final validation accuracy a point against the lr (the variants
// side by side around each lr), a panel per depth. plot_curves.png: at the deepest depth and the lr no-BN
// chose, every seed's train loss and validation accuracy against steps, no-BN against BN.
void design_plots(const fs::path& dir, const Plan& p, const Results& r) {
  std::ostringstream dat, gp;
  std::size_t block = 0;
  gp << "# Written by bnorm-train: gnuplot plot.gp (run in this folder)\n"
     << "set terminal pngcairo size " << 80 + 440 * p.depths.size() << ",420 font ',10' noenhanced\n"
     << "set output 'plot_lr.png'\nset multiplot layout 1," << p.depths.size()
     << " title 'final validation accuracy, every seed a point'\n"
     << "set logscale x\nset xrange [" << p.lrs.front() / 2 << ":" << p.lrs.back() * 2
     << "]\nset yrange [0:1]\nset grid\nset key left bottom\nset xlabel 'learning rate'\nset ylabel 'validation accuracy'\n";
  for (int d : p.depths) {
    gp << "set title 'depth " << d << "'\nplot ";
    for (std::size_t v = 0; v < p.variants.size(); ++v) {
      const double shift = std::pow(1.12, static_cast<double>(v) - (static_cast<double>(p.variants.size()) - 1) / 2);
      dat << "# depth " << d << " " << p.variants[v] << "\n";
      for (double lr : p.lrs)
        for (auto s : p.seeds)
          if (const RunResult* x = r.find(core_spec(p, d, p.variants[v], lr, s))) dat << lr * shift << " " << x->val_acc << "\n";
      dat << "0.001 NaN\n\n\n";
      gp << (v ? ", " : "") << "'plot.dat' index " << block++ << " using 1:2 with points pt 7 ps 0.9 " << style(p.variants[v])
         << " title '" << p.variants[v] << "'";
    }
    gp << ", 0.5 with lines lc rgb 'gray' dt 2 title 'fails below 0.5'\n";
  }
  gp << "unset multiplot\nunset logscale x\nset xrange [*:*]\n";
  std::vector<std::string> pngs{"plot_lr.png"};
  const int d = p.depths.back();
  if (const auto lr = chosen_lr(r, core_spec(p, d, "none", 0, 0), p.lrs, p.seeds)) {
    gp << "set terminal pngcairo size 1300,460 font ',10' noenhanced\nset output 'plot_curves.png'\nunset title\n"
       << "set multiplot layout 1,2 title 'depth " << d << ", lr " << *lr
       << " (chosen for no-BN): every seed, no-BN (black) against bnorm BN before ReLU (blue)'\nset xlabel 'step'\nset key right top\n";
    for (int panel = 0; panel < 2; ++panel) {
      gp << (panel ? "unset logscale y\nset yrange [0:1]\nset ylabel 'validation accuracy'\nset key right bottom\n"
                   : "set logscale y\nset yrange [*:*]\nset ylabel 'train loss (mean since the last evaluation)'\n")
         << "plot ";
      bool first = true;
      for (const std::string v : {"none", "bn_before"})
        for (auto s : p.seeds) {
          const RunResult* x = r.find(core_spec(p, d, v, *lr, s));
          if (!x) continue;
          dat << "# curve " << v << " seed " << s << "\n";
          for (const auto& [step, y] : panel ? x->val_curve : x->loss_curve) dat << step << " " << y << "\n";
          dat << "0 NaN\n\n\n";
          gp << (first ? "" : ", ") << "'plot.dat' index " << block++ << " using 1:2 with lines lw 1.5 " << style(v)
             << " title '" << (s == p.seeds.front() ? v : "") << "'";
          first = false;
        }
      gp << "\n";
    }
    gp << "unset multiplot\n";
    pngs.push_back("plot_curves.png");
  }
  replace_file(dir / "plot.dat", dat.str());
  run_gnuplot(dir, gp.str(), pngs);
}

}  // namespace

void write_design_report(const fs::path& dir, const Plan& p, const std::vector<Judged>& rows, const Results& results,
                         const ReportInfo& info) {
  std::ostringstream md, verdicts;
  md << "# What BatchNorm did here\n\n"
     << p.what << ". Every variant of a seed starts from the same weights and sees the same batches. Momentum SGD "
     << "(0.9), batch " << p.settings.batch << ".\n\n"
     << "Machine: " << cpu_name() << ", " << isa() << ". Command: `" << info.command << "`.\n\n"
     << "## Verdicts\n\n"
     << "| claim | design | effect [95% interval] | verdict | picture |\n|---|---|---|---|---|\n";
  for (const auto& j : rows) {
    const std::string v = verdict_text(j);
    md << "| " << j.claim->claim << " | " << (j.state == Judged::judged ? j.row.design : "-") << " | "
       << (j.state == Judged::judged ? j.row.effect : "-") << " | " << v << " | "
       << (j.state == Judged::judged && !j.row.picture.empty() ? cat("[", j.row.picture, "](", j.row.picture, ")") : "")
       << " |\n";
    verdicts << j.claim->id << ": " << v << "\n";
  }
  md << "\n**The rule.** Each claim is measured per seed as a paired effect (the same seed's weights and batches "
        "with and without what the claim is about): a difference of test accuracies, or a ratio of steps. The "
        "interval is the percentile bootstrap 95% interval of the mean difference (of the mean log ratio for "
        "ratios: a geometric mean), 10,000 resamples of the seeds. A claim is **supported** where the interval "
        "excludes 0 (a difference) or 1 (a ratio) on the side the claim predicts, **contradicted** where it excludes "
        "it on the other side, and inconclusive otherwise. With 6 to 8 seeds the bootstrap interval is somewhat "
        "narrower than 95%. Learning rates: a run *fails* where it diverges or ends under 0.5 validation accuracy; "
        "failures are k of n seeds with the Clopper-Pearson 95% interval; an lr *trains* where that interval lies "
        "below 1/2 and *fails* where it lies above. The learning rate of each variant is chosen on the validation "
        "images (held out from the training set: the highest mean final validation accuracy over the seeds); "
        "accuracies in the table are on the test images. Steps to a loss are counted per step on the mean of the "
        "last 20 losses; a run that never gets there counts its last step, which makes the ratio a bound, and a "
        "verdict that would rest on the wrong side of that bound is inconclusive. A claim of no effect (the bias) "
        "is supported where its interval lies within +-1 point. A claim this budget does not run is inconclusive "
        "at this budget.\n\n";
  md << "## Pictures\n\n![trainable range](plot_lr.png)\n\n![loss curves](plot_curves.png)\n\n";
  md << "## The runs\n\n`runs.csv` has one row per run (accuracies, steps to the loss threshold of "
     << p.settings.loss_threshold << " and to " << p.settings.val_target * 100 << "% validation accuracy, divergence, "
     << "the bias gradient ratio, ms per step), `steps.csv` every evaluation (every " << p.settings.eval_every
     << " steps), `runs.txt` what --resume reads.\n\n"
     << "This invocation trained " << info.trained << " runs in " << fmt("%.0f", info.train_seconds) << " s"
     << (info.resumed ? cat("; ", info.resumed, " runs were finished by an earlier one (--resume)") : std::string())
     << (info.stopped ? "; it stopped at --max-minutes, run it again to continue" : "") << ".\n";
  write_runs_csv(dir, results);
  replace_file(dir / "results.md", md.str());
  replace_file(dir / "verdicts.txt", verdicts.str());
  design_plots(dir, p, results);
}

void write_grid_report(const fs::path& dir, const Settings& st, const Results& results, const ReportInfo& info) {
  std::ostringstream md;
  md << "Command: `" << info.command << "`\n\n"
     << "| net | variant | optimizer | lr | init x | seed | val acc | test acc | train acc | steps to loss "
     << st.loss_threshold << " | steps to " << st.val_target * 100 << "% | diverged | ms / step | initial sum of abs(w) |\n"
     << "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
  auto opt = [](const std::optional<std::int64_t>& o) { return o ? std::to_string(*o) : std::string("not reached"); };
  for (const auto& r : results.all())
    md << "| " << r.spec.net_name() << " | " << r.spec.variant << " | " << r.spec.optimizer << " | " << r.spec.lr << " | "
       << r.spec.init << " | " << r.spec.seed << " | " << fmt("%.4f", r.val_acc) << " | " << fmt("%.4f", r.test_acc) << " | "
       << fmt("%.4f", r.train_acc) << " | " << opt(r.steps_to_loss) << " | " << opt(r.steps_to_val) << " | "
       << (r.diverged_at ? cat("step ", *r.diverged_at) : std::string("no")) << " | " << fmt("%.1f", r.sec_per_step * 1e3)
       << " | " << fmt("%.6f", r.init_checksum) << " |\n";
  if (st.precise_images > 0) {  // --precise-bn
    md << "\nTest accuracy with precise BN statistics (recomputed over the first " << st.precise_images
       << " training images with the final weights) against the moving averages:\n\n| run | moving averages | precise |\n"
          "|---|---|---|\n";
    for (const auto& r : results.all())
      if (r.precise_test_acc)
        md << "| " << r.spec.key() << " | " << fmt("%.4f", r.test_acc) << " | " << fmt("%.4f", *r.precise_test_acc)
           << " |\n";
  }
  md << "\nThis invocation trained " << info.trained << " runs in " << fmt("%.0f", info.train_seconds) << " s"
     << (info.resumed ? cat("; ", info.resumed, " runs were finished by an earlier one (--resume)") : std::string()) << ".\n";
  std::cout << md.str();
  write_runs_csv(dir, results);
  replace_file(dir / "results.md", md.str());
  // One picture per net: the first seed's runs.
  std::ostringstream dat, gp;
  std::vector<std::string> names, pngs;
  for (const auto& r : results.all())
    if (std::find(names.begin(), names.end(), r.spec.net_name()) == names.end()) names.push_back(r.spec.net_name());
  std::size_t block = 0;
  gp << "# Written by bnorm-train: gnuplot plot.gp (run in this folder)\n";
  for (const auto& name : names) {
    pngs.push_back(cat("plot_", name, ".png"));
    gp << "set terminal pngcairo size 1300,460 font ',10' noenhanced\nset output '" << pngs.back() << "'\n"
       << "set multiplot layout 1,2 title '" << name << ": the first seed'\nset grid\nset xlabel 'step'\nset key right\n";
    for (int panel = 0; panel < 2; ++panel) {
      gp << (panel ? "unset logscale y\nset ylabel 'validation accuracy'\n" : "set logscale y\nset ylabel 'train loss'\n") << "plot ";
      bool first = true;
      for (const auto& r : results.all()) {
        if (r.spec.net_name() != name || r.spec.seed != results.all().front().spec.seed) continue;
        for (const auto& [s, v] : panel ? r.val_curve : r.loss_curve) dat << s << " " << v << "\n";
        dat << "0 NaN\n\n\n";
        gp << (first ? "" : ", ") << "'plot.dat' index " << block++ << " using 1:2 with lines lw 1.5 " << style(r.spec.variant)
           << " title '" << r.spec.variant << " lr " << r.spec.lr << " x" << r.spec.init << "'";
        first = false;
      }
      gp << "\n";
    }
    gp << "unset multiplot\n";
  }
  replace_file(dir / "plot.dat", dat.str());
  run_gnuplot(dir, gp.str(), pngs);
}

}  // namespace bnorm::train
