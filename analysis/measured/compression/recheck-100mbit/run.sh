set -u
cd /work/main
for rep in 1 2; do
for c in none powersgd:2 topk:0.01; do
  n=$(echo $c | tr -d ':')
  timeout 600 .venv/bin/python -m analysis.cluster --nodes 4 --link 100mbit -- .venv/bin/python launch.py --algo ring --transport torch --world-size 4 --model simplecnn --dataset synthetic --batch-size 32 --epochs 1 --lr 0.05 --seed 0 --out /tmp/spd/${n}_r$rep --max-steps 25 --compress $c --eval-batches 4 --log-every 5 > /tmp/spd/${n}_r$rep.log 2>&1
  echo "$c rep $rep rc $?"
done
done
