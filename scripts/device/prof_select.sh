# profile the selection kernels at line level (ncu), summarised to a few KB
[ -d /work/main ] || { mkdir -p /work && ln -s "$PWD" /work/main; }
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/lib
for c in paper-k4096-t4k paper-k512-t16k; do
  timeout 120 ncu --clock-control none -k regex:select_topk_bucket --launch-count 1 --section WarpStateStats --section SourceCounters --section InstructionStats -o $OUT/sel_$c build-dev/omnimoe bench --device cuda --config $c --warmup 0 --iters 1 --skip-baselines --skip-ceilings > $OUT/ncu_$c.log 2>&1
  echo "ncu $c rc $?"
  ncu -i $OUT/sel_$c.ncu-rep --page source --csv --print-source cuda > /tmp/src_$c.csv 2>&1; echo "cuda src rc $?"
  python3 scripts/device/ncu_top_lines.py /tmp/src_$c.csv 45 > $OUT/lines_$c.txt 2>&1
  ncu -i $OUT/sel_$c.ncu-rep --page source --csv --print-source sass > /tmp/sass_$c.csv 2>&1
  python3 scripts/device/ncu_top_lines.py /tmp/sass_$c.csv 60 > $OUT/sass_$c.txt 2>&1
  ncu -i $OUT/sel_$c.ncu-rep --page details > $OUT/details_$c.txt 2>&1
  rm -f $OUT/sel_$c.ncu-rep
done
